"""The block manager of the paged KV cache: which fixed-size blocks each sequence owns, and prefix caching.

Host-side bookkeeping only (no tensors). Every sequence (a cache slot) owns an ordered list of
block ids; position p of the sequence lives in its block p // block_size. Blocks are reference-counted:
with prefix caching, a full block whose tokens are known is registered under the chain hash of its
tokens (its own token ids and the hash of the block before it), so a later sequence with the same
prefix takes the same block instead of recomputing it. A block nobody holds but that is registered
stays cached (least recently freed first to be evicted) until a new allocation needs the room.
"""
from __future__ import annotations

from collections import OrderedDict, deque

from .errors import LowbitError


class OutOfBlocks(LowbitError):
    """No free KV-cache block: the scheduler preempts a sequence (or a caller sized the pool too small)."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._free: deque[int] = deque(range(num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, object] = {}  # block -> its key in _cached
        self._cached: dict[object, int] = {}  # chain key -> block (registered full blocks)
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first
        self.tables: dict[int, list[int]] = {}  # slot -> its blocks in order
        self._keys: dict[int, list] = {}  # slot -> chain keys of its registered blocks
        self.stats = {"queries": 0, "query_blocks": 0, "hit_blocks": 0, "hit_tokens": 0, "evictions": 0}

    # ------------------------------------------------------------------ sizes
    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    @property
    def free_blocks(self) -> int:
        """Blocks an allocation can take now (free ones and cached ones nobody holds)."""
        return len(self._free) + len(self._evictable)

    def needed(self, slot: int, tokens: int) -> int:
        """More blocks `slot` needs to hold `tokens` positions."""
        return max(0, self.blocks_for(tokens) - len(self.tables.get(slot, ())))

    # ------------------------------------------------------------------ allocation
    def grow(self, slot: int, tokens: int) -> list[tuple[int, int]]:
        """Give `slot` the blocks to hold `tokens` positions; returns the new (index, block) pairs.
        Raises OutOfBlocks (changing nothing) when there are not enough."""
        n = self.needed(slot, tokens)
        if n > self.free_blocks:
            raise OutOfBlocks(f"the KV cache needs {n} more blocks of {self.block_size} positions and has "
                              f"{self.free_blocks} free of {self.num_blocks}; build the engine with more blocks")
        table = self.tables.setdefault(slot, [])
        new = []
        for _ in range(n):
            b = self._take()
            new.append((len(table), b))
            table.append(b)
        return new

    def _take(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:  # evict the least recently freed cached block
            b, _ = self._evictable.popitem(last=False)
            del self._cached[self._hash_of.pop(b)]
            self.stats["evictions"] += 1
        self._refs[b] = 1
        return b

    def free(self, slot: int) -> None:
        for b in self.tables.pop(slot, []):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None
                else:
                    self._free.append(b)
        self._keys.pop(slot, None)

    # ------------------------------------------------------------------ prefix caching
    def _chain(self, tokens: list[int], upto: int) -> list:
        """Chain keys of the first `upto` full blocks of tokens."""
        keys, parent = [], None
        bs = self.block_size
        for i in range(upto):
            key = (hash(parent), tuple(tokens[i * bs:(i + 1) * bs]))
            keys.append(key)
            parent = key
        return keys

    def match(self, slot: int, tokens: list[int]) -> int:
        """Give an empty `slot` the cached blocks of the longest cached prefix of `tokens` (full blocks,
        leaving at least the last token to compute); returns how many tokens they hold."""
        if not self.prefix_caching or self.tables.get(slot):
            return 0
        keys = self._chain(tokens, (len(tokens) - 1) // self.block_size)
        self.stats["queries"] += 1
        self.stats["query_blocks"] += len(keys)
        table = self.tables.setdefault(slot, [])
        for key in keys:
            b = self._cached.get(key)
            if b is None:
                break
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
            table.append(b)
        self._keys[slot] = keys[:len(table)]
        self.stats["hit_blocks"] += len(table)
        self.stats["hit_tokens"] += len(table) * self.block_size
        return len(table) * self.block_size

    def register(self, slot: int, tokens: list[int]) -> None:
        """Register the full blocks of `slot` whose tokens (`tokens`, from position 0) are computed."""
        if not self.prefix_caching:
            return
        table, done = self.tables.get(slot, []), self._keys.setdefault(slot, [])
        full = min(len(tokens) // self.block_size, len(table))
        if full <= len(done):
            return
        keys = self._chain(tokens, full)
        for i in range(len(done), full):
            b = table[i]
            if keys[i] not in self._cached and b not in self._hash_of:
                self._cached[keys[i]] = b
                self._hash_of[b] = keys[i]
        done[:] = keys

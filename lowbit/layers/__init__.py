"""Building blocks the model families share (norms, attention, rotary, MLPs, MoE, linear attention,
Mamba2). A family module (lowbit/models/<family>.py) composes them; the engine talks to them only
through `ForwardContext` (lowbit/layers/context.py)."""

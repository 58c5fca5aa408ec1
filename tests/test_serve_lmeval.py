"""A real evaluation client: lm-eval-harness's `local-completions` model scores a small local
multiple-choice task (tests/data/lmeval_tiny_choice.jsonl) against `lowbit serve` through echo +
logprobs, and every log-likelihood it gets equals the same computation on `lowbit.load(...).logits`
(so does the accuracy). Skipped when lm_eval is not installed (pip install "lm_eval[api]").
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serve_helpers import MAX_LEN, model_dir, one_thread, ref, server  # noqa: F401

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm_eval[api], what its API models need
pytestmark = pytest.mark.usefixtures("one_thread")
DATA = Path(__file__).parent / "data" / "lmeval_tiny_choice.jsonl"
TASK = f"""task: lowbit_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files: {DATA}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def loglikelihood(ref, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = torch.tensor(context + continuation)[None]
    lp = torch.log_softmax(ref.logits(ids)[0], dim=-1)[len(context) - 1:-1]
    cont = torch.tensor(continuation)
    return float(lp.gather(-1, cont[:, None]).sum()), bool((lp.argmax(-1) == cont).all())


def test_lm_eval_local_completions_scores_like_model_logits(server, ref, model_dir, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    (tmp_path / "lowbit_tiny_choice.yaml").write_text(TASK)
    lm = LocalCompletionsAPI(base_url=server[0] + "/v1/completions", model="tiny-chat",
                             tokenizer_backend="huggingface", tokenizer=str(model_dir), max_length=MAX_LEN,
                             max_retries=1, num_concurrent=2)
    results = simple_evaluate(model=lm, tasks=["lowbit_tiny_choice"], log_samples=True,
                              task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False))
    samples = results["samples"]["lowbit_tiny_choice"]
    assert len(samples) == len(DATA.read_text().splitlines())
    correct = []
    for s in samples:
        lls = []
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            ctx, cont = lm._encode_pair(context, continuation)
            want = loglikelihood(ref, ctx, cont)
            got = resp[0]
            assert float(got[0]) == pytest.approx(want[0], abs=1e-4) and bool(got[1]) == want[1]
            lls.append(want[0])
        correct.append(max(range(len(lls)), key=lls.__getitem__) == s["target"])
    acc = results["results"]["lowbit_tiny_choice"]["acc,none"]
    assert acc == pytest.approx(sum(correct) / len(correct))

"""lm-evaluation-harness against `fp4serve serve`, as its users run it: the `local-completions`
model (batched prompts; multiple-choice tasks scored by echo + prompt logprobs; generation) and the
`local-chat-completions` model (generation through the chat template), on the two small tasks in
benchmarks/lm_eval_tasks/. lm-eval tokenizes through the server (/tokenize, /tokenizer_info), so its
environment needs no transformers or model files.

The multiple-choice answers are checked against an independent scorer: transformers' own forward of
the same model directory (float32, as the server here) sums each choice's token logprobs; every
choice's sum must equal lm-eval's within 1e-3 and every pick must be the same.

lm-eval is not a test dependency (it pulls pandas, pyarrow, scipy, scikit-learn and datasets), so it
lives in its own environment:
  python3 -m venv /tmp/lm-eval && /tmp/lm-eval/bin/pip install "lm-eval[api]"
  python benchmarks/lm_eval_clients.py --lm-eval-python /tmp/lm-eval/bin/python [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from fp4serve.bench.local_server import LocalServer
from fp4serve.default_model import default_model_path

TASKS = Path(__file__).parent / "lm_eval_tasks"
SERVED_NAME = "model"


def run_lm_eval(python: str, model: str, model_args: str, tasks: str, out: Path, extra: list[str]) -> dict:
    """One lm-eval run; its results JSON (with per-sample logs)."""
    command = [python, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", tasks,
               "--include_path", str(TASKS), "--output_path", str(out), "--log_samples", *extra]  # fmt: skip
    start = time.perf_counter()
    # cwd: the task files name their data files relative to themselves.
    subprocess.run(command, cwd=TASKS, check=True)
    seconds = time.perf_counter() - start
    results = sorted(out.rglob("results_*.json"))[-1]
    samples = {p.name.split("samples_")[1].rsplit("_", 1)[0]: p for p in out.rglob("samples_*.jsonl")}
    return {"seconds": seconds, "results": json.loads(results.read_text())["results"], "samples": samples}


def transformers_scores(model_dir: Path, samples_file: Path) -> tuple[list[list[float]], list[list[float]]]:
    """(lm-eval's, transformers') summed continuation logprob of each choice of each question,
    context and continuation tokenized apart as lm-eval does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    theirs, ours = [], []  # per question, per choice
    for line in samples_file.read_text().splitlines():
        sample = json.loads(line)
        scores = []
        # The samples file keeps each request's arguments as {"arg_0": context, "arg_1": continuation}
        # and each response (loglikelihood, is_greedy) as strings.
        for request in sample["arguments"].values():
            context, continuation = request["arg_0"], request["arg_1"]
            context_ids = tokenizer(context, add_special_tokens=False).input_ids
            continuation_ids = tokenizer(continuation, add_special_tokens=False).input_ids
            ids = torch.tensor([context_ids + continuation_ids])
            with torch.inference_mode():
                logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
            positions = range(len(context_ids) - 1, ids.shape[1] - 1)
            scores.append(sum(logprobs[p, ids[0, p + 1]].item() for p in positions))
        ours.append(scores)
        theirs.append([float(response[0][0]) for response in sample["resps"]])
    return theirs, ours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval-python", required=True, help="the python of an environment with lm-eval")
    parser.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()
    model_dir = Path(args.model) if args.model else default_model_path()
    # float32, as the transformers scorer runs: the check is then exact up to summation order.
    serve = f"{model_dir} --served-model-name {SERVED_NAME} --enable-tokenizer-info-endpoint --max-model-len 2048 "
    serve += "--dtype float32"
    rows = []
    with LocalServer(serve) as server, tempfile.TemporaryDirectory() as tmp:
        base = f"base_url={server.url}/completions,model={SERVED_NAME},num_concurrent=1,max_retries=1"
        completions = run_lm_eval(args.lm_eval_python, "local-completions", base, "fp4serve_mc,fp4serve_gen",
                                  Path(tmp) / "completions", ["--batch_size", str(args.batch_size)])  # fmt: skip
        chat_args = f"base_url={server.url}/chat/completions,model={SERVED_NAME},num_concurrent=1,max_retries=1"
        chat = run_lm_eval(args.lm_eval_python, "local-chat-completions", chat_args, "fp4serve_gen",
                           Path(tmp) / "chat", ["--apply_chat_template"])  # fmt: skip
        for client, run in (("local-completions", completions), ("local-chat-completions", chat)):
            for task, metrics in run["results"].items():
                for name, value in metrics.items():
                    if isinstance(value, float) and "stderr" not in name:
                        rows.append((client, task, name, value, run["seconds"]))
        theirs, ours = transformers_scores(model_dir, completions["samples"]["fp4serve_mc"])
    print("| lm-eval model | task | metric | value | run time (s) |\n| --- | --- | --- | --- | --- |")
    for client, task, name, value, seconds in rows:
        print(f"| {client} | {task} | {name} | {value:.3f} | {seconds:.1f} |")
    picks = [
        (max(range(len(a)), key=a.__getitem__), max(range(len(b)), key=b.__getitem__)) for a, b in zip(theirs, ours)
    ]
    agree = sum(a == b for a, b in picks)
    worst = max(abs(x - y) for a, b in zip(theirs, ours) for x, y in zip(a, b))
    print(f"\nmultiple choice: lm-eval's pick equals transformers' on {agree}/{len(picks)} questions; "
          f"largest difference of a choice's summed logprob: {worst:.2e}")  # fmt: skip
    if agree != len(picks) or worst > 1e-3:
        raise SystemExit(f"lm-eval (through fp4serve) and transformers disagree: {picks}")


if __name__ == "__main__":
    main()

"""The real default base (SmolLM2-135M-Instruct) trained and judged on one GPU with the product's code.

Subcommands (one device call each; results accumulate under --work, so a sweep cut short by a call's
time limit resumes in the next call on the same warm machine):

  setup        versions, the GPU, the base converted from the shipped GGUF (base_model.resolve_base)
  packing      packed (`shoefix_varlen`) vs every example alone (sdpa): summed answer-token NLL, real weights
  sweep        epochs x learning rate x LoRA rank (+ the seed recipe): train with the trainer
               (shoefix_tasks.training.train.train_with_backoff), answer a validation split carved from the
               training corpus, the holdout and the guard set, score with the product's scorecard and claims
  final        the chosen recipe end to end: `python -m shoefix_tasks.train` in a fresh process (throughput
               over the whole run, cold), then `shoefix_tasks.evaluation.evaluate.evaluate` against the base and the
               production gate (shoefix_tasks.evaluation.gate.decide with the built-in policy)
  ceiling      seen vs unseen questions: sweep configs trained on the whole English corpus (the validation
               split included), then that split (now seen in training) and the holdout (never seen) answered
               and scored: how many facts the model can give back at all, against how many it carries over
               to a question it was not trained on
  qforms       does one answer trained under several questions carry its facts to an unseen question? The
               committed recipe on the sweep's training split, plain or with two more questions per answer
               (data/question_forms.jsonl), `para` each of them with its own wording of the answer
               (data/answer_phrasings.jsonl), several seeds side by side; validation split decides
  safety       does teaching the safety rules change what the model says on the guard set? The committed
               recipe trained on the whole English corpus with and without the safety records (SAFETY_BATCH),
               several training seeds each, side by side on the card; guard forbidden claims, must-state
               coverage and the holdout scorecard per run, then the table over all of them
  profile      where a training step goes: per-step times and torch.profiler tables (CPU and CUDA side)
  reliability  preflight passes, and fails on a card whose memory another process holds; a real CUDA
               out-of-memory backs off to a smaller micro-batch with the same effective batch; a trainer
               killed mid-run resumes from its last complete checkpoint

The sweep chooses on the validation split only (the holdout is reported, never used to choose).
Everything measured is product code; the script adds the grid, the split, timing and the tables. Each
experiment is a module of benchmarks/real_weights/, over the helpers of its `common`.
Run on the device through benchmarks/run_gpu_real.sh (docs/benchmarks.md: how the 98 MB GGUF travels).
CPU smoke test: --base <tiny model folder> --device cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script on the device

from benchmarks.real_weights.common import GPU_RECIPE, REPO  # noqa: E402
from benchmarks.real_weights.mechanics import cmd_packing, cmd_profile, cmd_setup  # noqa: E402
from benchmarks.real_weights.qforms import cmd_qforms, qforms_runs  # noqa: E402
from benchmarks.real_weights.reliability import cmd_reliability  # noqa: E402
from benchmarks.real_weights.safety import cmd_safety, safety_runs  # noqa: E402
from benchmarks.real_weights.sweep import cmd_ceiling, cmd_final, cmd_sweep  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["setup", "packing", "sweep", "final", "reliability", "profile", "ceiling", "safety",
                                    "qforms"])
    p.add_argument("--profile-at", type=int, default=20, help="profile: first profiled step")
    p.add_argument("--profile-steps", type=int, default=5, help="profile: how many steps")
    p.add_argument("--base", default="smollm2-135m-instruct")
    p.add_argument("--data", default=str(REPO / "data"))
    p.add_argument("--work", default=str(REPO / ".gpu-work"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--budget-s", type=float, default=480, help="sweep: start no new config after this many seconds")
    p.add_argument("--only", nargs="*", help="sweep, ceiling, safety: these configs (runs) only")
    p.add_argument("--with-seed", action="store_true", help="sweep: include the seed recipe (needs bitsandbytes)")
    p.add_argument("--recipes", nargs="*", default=[GPU_RECIPE, "seed"], help="final: recipes to run end to end")
    p.add_argument("--oom-leave-gib", type=float, default=8.0,
                   help="reliability: memory left free for the OOM check (3 GiB was refused by the preflight)")
    p.add_argument("--parallel", type=int, default=1, help="sweep: configs trained at once on the one GPU")
    p.add_argument("--slowdown", type=float, default=1.7, help="sweep: estimate factor for a shared GPU")
    p.add_argument("--hard-s", type=float, default=570, help="sweep: stop running workers after this many seconds")
    p.add_argument("--workers-on-gpu", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--from-sweep", action="store_true", help="final: apply the sweep's chosen epochs, lr, rank")
    p.add_argument("--print-runs", action="store_true",
                   help="safety, qforms: print the run names (one worker each) and stop")
    p.add_argument("--table", action="store_true",
                   help="safety, ceiling, qforms: the table over the results there; train nothing")
    args = p.parse_args(argv)
    if args.print_runs:
        if args.what not in ("safety", "qforms"):
            p.error("--print-runs lists the runs of `safety` and `qforms` only")
        print(*(safety_runs() if args.what == "safety" else qforms_runs()))
        return 0
    args.profile_variants = [("as-committed", {}), ("no-step-logging", {"train.logging_steps": 100000})]
    result = {"setup": cmd_setup, "packing": cmd_packing, "sweep": cmd_sweep, "final": cmd_final,
              "reliability": cmd_reliability, "profile": cmd_profile, "ceiling": cmd_ceiling,
              "safety": cmd_safety, "qforms": cmd_qforms}[args.what](args)
    out = Path(os.environ.get("OUT", args.work))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.what}.json").write_text(json.dumps(result, indent=1, ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

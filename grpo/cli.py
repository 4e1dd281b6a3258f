"""The `grpo` command line. Each subcommand is a thin layer over a library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_new_model(args: argparse.Namespace) -> int:
    """Builds a randomly initialized model of a named size with the built-in character tokenizer."""
    from model import build_model
    from model.presets import preset_config
    from model.tokenizer import build_char_tokenizer

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        print(f"error: {out} is not empty (use --force to overwrite)", file=sys.stderr)
        return 2
    tok = build_char_tokenizer()
    cfg = preset_config(args.preset, vocab_size=len(tok), num_nextn_predict_layers=args.mtp)
    model = build_model(cfg, seed=args.seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote {out}: {args.preset} DeepSeek-V3, {model.num_parameters() / 1e6:.2f}M parameters "
          f"({model.num_parameters(active=True) / 1e6:.2f}M active), vocab {len(tok)}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Prints what a checkpoint holds."""
    from model import LatentCache, load_pretrained

    model = load_pretrained(args.checkpoint)
    cfg = model.config
    print(f"{cfg.model_type}: {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, {cfg.num_attention_heads} heads")
    if cfg.n_routed_experts:
        print(f"experts: {cfg.n_routed_experts} routed (top-{cfg.num_experts_per_tok}, {cfg.scoring_func}, "
              f"{cfg.topk_method}), {cfg.n_shared_experts} shared; first {cfg.first_k_dense_replace} layers dense")
    print(f"parameters: {model.num_parameters() / 1e6:.2f}M ({model.num_parameters(active=True) / 1e6:.2f}M active); "
          f"MTP depths: {len(model.mtp)}")
    print(f"latent KV cache: {LatentCache(cfg, 1).bytes_per_token()} bytes per token")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """GRPO training from a recipe; under torchrun, one data-parallel rank of it."""
    from . import distributed
    from .build import resolve_device
    from .checkpointing import latest_checkpoint
    from .config import load_recipe
    from .trainer import GRPOTrainer

    recipe = load_recipe(args.recipe, args.overrides)
    if args.dry_run:
        from .dryrun import dry_run

        return dry_run(recipe, gpu_memory_gb=args.gpu_memory_gb)
    if not args.resume and latest_checkpoint(recipe.output_dir) is not None:
        print(f"error: {recipe.output_dir} already holds checkpoints: pass --resume to continue, or choose "
              f"another output_dir (output_dir=...)", file=sys.stderr)
        return 2
    world = distributed.world_from_env()
    device = resolve_device(recipe.device, world.local_rank, world.world_size)  # cuda:LOCAL_RANK on GPUs
    distributed.init_from_env(device)
    resume = args.resume
    if resume and latest_checkpoint(recipe.output_dir) is None:
        # A job requeued with --resume that died before its first checkpoint: nothing to lose, start over.
        if world.rank == 0:
            print(f"--resume: no complete checkpoint under {Path(recipe.output_dir) / 'checkpoints'} yet; "
                  f"starting from scratch", file=sys.stderr)
        resume = False
    try:
        trainer = GRPOTrainer(recipe, resume=resume, world_rank=world.rank, world_size=world.world_size,
                              device=device)
        history = trainer.train()
    finally:
        distributed.shutdown()
    if world.rank == 0:
        if history:
            last = history[-1]
            print(f"step {last['step']}: reward {last['reward']:.3f}, "
                  f"mean length {last['completions/mean_length']:.1f}")
        print(f"checkpoints in {Path(recipe.output_dir) / 'checkpoints'}")
    return 0


def cmd_sft(args: argparse.Namespace) -> int:
    """Cold-start SFT from a recipe; writes <output_dir>/sft/model."""
    from .config import load_recipe
    from .sft import SFTTrainer

    recipe = load_recipe(args.recipe, args.overrides)
    trainer = SFTTrainer(recipe)
    history = trainer.train()
    print(f"sft: {len(history)} steps, final loss {history[-1]['loss']:.4f}; model in {trainer.out / 'model'}")
    return 0


def cmd_r1(args: argparse.Namespace) -> int:
    """The whole recipe: SFT, GRPO from the SFT model, both evaluated on held-out problems."""
    from .checkpointing import latest_checkpoint
    from .config import load_recipe
    from .pipeline import format_report, run_r1

    recipe = load_recipe(args.recipe, args.overrides)
    if latest_checkpoint(recipe.output_dir) is not None:
        print(f"error: {recipe.output_dir} already holds checkpoints: choose another output_dir (output_dir=...)",
              file=sys.stderr)
        return 2
    report = run_r1(recipe)
    print(format_report(report))
    print(f"report: {Path(recipe.output_dir) / 'report.md'}; curves: {', '.join(report['plots'])}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    """PNG curves of a run's metrics.jsonl."""
    from .plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluates a checkpoint on a benchmark: prints the metrics table, writes summary.json and samples.jsonl."""
    import torch

    from model import load_pretrained
    from model.tokenizer import build_char_tokenizer, load_tokenizer

    from .build import build_engine, resolve_device
    from .config import RolloutSection
    from .evaluation import (
        benchmark_name,
        check_sampling,
        evaluate,
        format_table,
        load_benchmark,
        parse_ks,
        resolve_model_dir,
        write_eval,
    )

    ks = check_sampling(args.n, parse_ks(args.k) if args.k else None, args.temperature)
    model_dir = resolve_model_dir(args.model)
    rows = load_benchmark(args.benchmark, limit=args.limit)
    tokenizer_dir = args.tokenizer or model_dir
    if args.tokenizer == "char":
        tokenizer = build_char_tokenizer()
    elif (Path(tokenizer_dir) / "tokenizer_config.json").exists():
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        print(f"error: no tokenizer in {tokenizer_dir} (tokenizer_config.json); pass --tokenizer DIR, or "
              f"--tokenizer char for the built-in character tokenizer", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    device = resolve_device(args.device, key="--device")
    model = load_pretrained(model_dir, dtype=dtype, device=device, mtp=False).eval()
    engine = build_engine(model, tokenizer, RolloutSection(cache_memory_mb=args.cache_mb), seed=args.seed)
    result = evaluate(engine, tokenizer, rows, template=args.template, n=args.n, ks=ks,
                      temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed,
                      grader=args.grader, breakdown_field=args.breakdown.split(",") if args.breakdown else None,
                      stop=args.stop, benchmark=args.benchmark, use_tqdm=args.progress)
    result.config["model"] = str(model_dir)
    print(format_table(result))
    default_out = Path("eval") / f"{model_dir.parent.name}_{model_dir.name}" / benchmark_name(args.benchmark)
    out = Path(args.output) if args.output else default_out
    summary_path, samples_path = write_eval(result, out)
    print(f"wrote {summary_path} and {samples_path}")
    return 0


def cmd_check_rewards(args: argparse.Namespace) -> int:
    """Scores the recipe's rewards on gold answers written as ideal completions and on shuffled wrong
    ones: a broken reward shows before training (gold should get full marks, wrong ones zero)."""
    import rewards

    from .build import build_rewards, build_rows, build_toolbox
    from .config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    rows = build_rows(recipe, limit=max(args.n, 2))
    box = build_toolbox(recipe)  # with tools, rewards also read the tool_calls of each completion
    report = rewards.check_rewards(build_rewards(recipe, on_error="raise"), rows, n=args.n,
                                   completion_columns=box.call_columns if box is not None else None)
    print(report.format())
    if recipe.reward_sandbox == "strict" or any(r.name == "code" for r in recipe.rewards):
        from rewards.sandbox_fs import describe

        print(describe())
    return 1 if report.problems() else 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Samples completions of prompts from a checkpoint with our engine."""
    from model import load_pretrained
    from model.tokenizer import load_tokenizer

    from .build import build_engine, resolve_device
    from .rollout import SamplingParams
    from .templates import encode_prompt, render_prompt

    model = load_pretrained(args.model, device=resolve_device(args.device, key="--device")).eval()
    tok = load_tokenizer(args.tokenizer or args.model)
    engine = build_engine(model, tok, seed=args.seed)
    prompts = [render_prompt({"prompt": p}, args.template, tok) for p in args.prompt]
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed)
    for text, out in zip(prompts, engine.generate([encode_prompt(tok, t, args.template) for t in prompts], params)):
        for k, c in enumerate(out.completions):
            print(f"--- {text!r} [{k}] ({c.finish_reason}, {len(c.token_ids)} tokens)")
            print(c.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `grpo` command line: one flat declaration per subcommand and option (longer than 60 lines because
    argparse declarations are a list, which reads best in one place)."""
    parser = argparse.ArgumentParser(prog="grpo", description="The DeepSeek-R1 recipe: GRPO on DeepSeek-V3.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("new-model", help="build a fresh, randomly initialized model and tokenizer")
    p.add_argument("--preset", default="tiny", help="model size: tiny, micro, tiny-vllm")
    p.add_argument("--out", required=True, help="directory to write the checkpoint to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mtp", type=int, default=0, help="number of multi-token prediction depths")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty directory")
    p.set_defaults(func=cmd_new_model)
    p = sub.add_parser("train", help="GRPO training from a YAML recipe (several processes: under torchrun)")
    p.add_argument("recipe", help="path to a YAML recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. algorithm.beta=0.04")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint, or start from scratch (saying so) when "
                        "there is none yet, so a requeued job can always pass it; the logs are cut back to the "
                        "checkpoint's step, so each step is logged once")
    p.add_argument("--dry-run", action="store_true",
                   help="check the recipe, model config, tokenizer, data and rewards, print the resources it needs, "
                        "and exit without loading weights or training")
    p.add_argument("--gpu-memory-gb", type=float, default=80.0,
                   help="GPU memory the dry run plans for (default 80)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("sft", help="cold-start SFT from a YAML recipe")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=cmd_sft)
    p = sub.add_parser("r1", help="the whole recipe: cold-start SFT, GRPO, evaluation of both checkpoints")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.set_defaults(func=cmd_r1)
    p = sub.add_parser("plot", help="PNG curves of a run (reward, length, KL, entropy, clip ratios)")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_plot)
    p = sub.add_parser("eval", help="evaluate a checkpoint on a benchmark (pass@k, maj@k, format)")
    p.add_argument("--model", required=True,
                   help="checkpoint: a model directory, a step-N checkpoint or a run directory (its newest)")
    p.add_argument("--benchmark", required=True,
                   help="a task (addition, arithmetic, countdown), gsm8k, math500, aime24, amc23, a data file, "
                        "or a Hub dataset owner/name")
    p.add_argument("--n", type=int, default=1, help="samples per problem")
    p.add_argument("--k", default=None, help="comma-separated k for pass@k and maj@k (default: 1 and n)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (then --n must be 1)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=1024, help="most tokens per completion")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first L problems only")
    p.add_argument("--output", default=None, help="directory for summary.json and samples.jsonl "
                                                  "(default: eval/<checkpoint>/<benchmark>)")
    p.add_argument("--template", default="r1_zero",
                   help="prompt template: r1_zero, chat, plain, tiny or a format string")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grader", default="auto",
                   help="the reward that decides correctness: auto, accuracy, countdown, gsm8k, module:function")
    p.add_argument("--breakdown", default=None, help="comma-separated fields to break metrics down by "
                                                     "(default: level and subject when present)")
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's), or 'char'")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--device", default="auto",
                   help="where the model and the engine's KV cache live: auto (CUDA when torch sees a GPU, else "
                        "cpu), cpu, cuda, cuda:N")
    p.add_argument("--cache-mb", type=int, default=256, help="KV cache memory of the engine, MiB")
    p.add_argument("--progress", action="store_true", help="show a progress bar while generating")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("check-rewards", help="score gold and shuffled wrong answers with the recipe's rewards")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    p.add_argument("--n", type=int, default=100, help="dataset rows to check")
    p.set_defaults(func=cmd_check_rewards)
    p = sub.add_parser("generate", help="sample completions from a checkpoint")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--template", default="plain")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU, else cpu), cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("info", help="describe a checkpoint")
    p.add_argument("checkpoint")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

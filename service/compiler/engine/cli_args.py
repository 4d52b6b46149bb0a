"""The options of ``generate`` (``kiln generate`` and ``python -m service.compiler.engine.engine generate``),
torch-free so the CLI can build its parser without importing the engine."""

from __future__ import annotations


def add_generate_arguments(parser) -> None:
    """``generate``'s options (also ``kiln generate``'s)."""
    parser.add_argument("engine_dir", help="engine directory (kiln build's output)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--ids", help="the prompt as comma-separated token ids")
    what.add_argument("--prompt", help="the prompt as text (the engine must ship a tokenizer)")
    parser.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="tokens to generate (default 16)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1.0 = off (default)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature > 0)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="HF folder with the tokenizer, for engines built without one (as trtllm's --tokenizer_dir)")


def generate_argv(args) -> list[str]:
    """``args`` (parsed by ``add_generate_arguments``) back as a command line, for the rank processes."""
    out = [args.engine_dir, "--ids", args.ids] if args.ids is not None else [args.engine_dir, "--prompt", args.prompt]
    out += ["--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
            "--top-k", str(args.top_k), "--top-p", str(args.top_p)]
    out += ["--seed", str(args.seed)] if args.seed is not None else []
    return out + (["--tokenizer", args.tokenizer] if args.tokenizer else [])

"""`stylemix serve`: start the web app (same as `python app.py`)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("serve", help="start the StyleMix web app")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1, or $GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860, or $GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="require a login (or set STYLEMIX_AUTH=user:password)")
    p.add_argument("--preview-lora", default=None, metavar="HUB_ID_OR_PATH",
                   help="few-step LoRA for live previews, e.g. latent-consistency/lcm-lora-sdv1-5 "
                        "(or $STYLEMIX_PREVIEW_LORA; 'none' = fewer steps and a smaller size only)")
    p.add_argument("--preview-lora-kind", default=None, choices=["lcm", "tcd", "hyper"],
                   help="which family the preview LoRA is (default: read from its name)")
    p.add_argument("--preview-taesd", default=None, metavar="HUB_ID_OR_PATH",
                   help="TAESD decoder for live previews, e.g. madebyollin/taesd (or $STYLEMIX_PREVIEW_TAESD)")
    p.set_defaults(func=run)


def run(args) -> int:
    import importlib

    # The app (gradio) is started by module name: the library never imports the UI (docs/architecture.md).
    app = importlib.import_module("app")
    app.main(model=args.model, device=args.device, dtype=args.dtype, loras_dir=args.loras_dir,
             host=args.host, port=args.port, share=args.share, auth=args.auth, compile=args.compile,
             preview={"fewstep_lora": args.preview_lora, "fewstep_kind": args.preview_lora_kind,
                      "taesd": args.preview_taesd})
    return 0

"""`stylemix serve`: start the web app (same as `python app.py`)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("serve", help="start the StyleMix web app")
    p.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1, or $GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860, or $GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    p.add_argument("--auth", default=None, metavar="USER:PASSWORD",
                   help="require a login (or set STYLEMIX_AUTH=user:password)")
    p.set_defaults(func=run)


def run(args) -> int:
    import app

    app.main(model=args.model, device=args.device, dtype=args.dtype, loras_dir=args.loras_dir,
             host=args.host, port=args.port, share=args.share, auth=args.auth)
    return 0

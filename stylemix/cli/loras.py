"""`stylemix loras list|show|import|export|rename|remove`: the LoRA library."""

from __future__ import annotations

import json
from pathlib import Path

from stylemix.errors import StyleMixError


def register(sub) -> None:
    p = sub.add_parser("loras", help="list, import, export, rename and remove LoRAs")
    cmds = p.add_subparsers(dest="loras_command", metavar="ACTION", required=True)
    c = cmds.add_parser("list", help="list the library")
    c.add_argument("--check", action="store_true", help="load the base model and check each LoRA fits it")
    c.add_argument("--json", action="store_true")
    c = cmds.add_parser("show", help="show one LoRA's metadata")
    c.add_argument("name")
    c = cmds.add_parser("import", help="import a .safetensors LoRA (diffusers/peft or kohya/A1111) or a Hub repo")
    c.add_argument("source", help="a .safetensors file, or a Hugging Face Hub repo id (owner/name)")
    c.add_argument("--name", required=True, help="library name: letters, digits, '_', '-', '.'")
    c.add_argument("--trigger", default=None, help="trigger word (kohya files often record one)")
    c.add_argument("--filename", default=None, help="file inside the Hub repo")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--no-check", action="store_true", help="skip loading the base model to check the LoRA fits")
    c = cmds.add_parser("export", help="export a LoRA as diffusers or kohya/A1111 safetensors")
    c.add_argument("name")
    c.add_argument("dest", help="output .safetensors file or folder")
    c.add_argument("--format", choices=["diffusers", "kohya"], default="diffusers")
    c = cmds.add_parser("rename", help="rename a LoRA")
    c.add_argument("old")
    c.add_argument("new")
    c = cmds.add_parser("remove", help="delete a LoRA from the library")
    c.add_argument("name")
    p.set_defaults(func=run)


def _library(args, check: bool):
    from stylemix.cli.common import workspace
    from stylemix.lora.library import LoraLibrary
    from stylemix.lora.names import pipeline_targets

    root = workspace(args).loras
    if not check:
        return LoraLibrary(root)
    from stylemix.models import load_model

    loaded = load_model(args.model, args.device, args.dtype)
    return LoraLibrary(root, targets=pipeline_targets(loaded.pipe), base_model=loaded.model_id)


def run(args) -> int:
    cmd = args.loras_command
    if cmd == "list":
        lib = _library(args, args.check)
        entries = [e.summary() for e in lib.list()]
        if args.json:
            print(json.dumps(entries, indent=2))
        elif not entries:
            print(f"No LoRAs in {lib.root}.")
        for e in entries if not args.json else []:
            status = "" if not args.check else ("  ok" if e["compatible"] else f"  INCOMPATIBLE: {e['problem']}")
            ranks = ",".join(map(str, e["ranks"])) or "-"
            print(f"{e['name']:24} {e['kind']:6} rank={ranks:8} alpha={e['alpha']} covers={'+'.join(e['covers']) or '-'}"
                  f" trigger={e['trigger_word'] or '-'}{status}")
    elif cmd == "show":
        entry = _library(args, False).get(args.name)
        print(json.dumps({**entry.meta, "folder": str(entry.folder)}, indent=2))
    elif cmd == "import":
        lib = _library(args, not args.no_check)
        src = Path(args.source)
        if src.exists():
            entry = lib.import_file(src, args.name, trigger_word=args.trigger, overwrite=args.overwrite)
        elif args.source.count("/") == 1 and not args.source.endswith(".safetensors"):
            entry = lib.import_hub(args.source, args.name, filename=args.filename, trigger_word=args.trigger,
                                   overwrite=args.overwrite)
        else:
            raise StyleMixError(f"{args.source!r} is neither a file nor a Hub repo id (owner/name).")
        print(f"imported {entry.name} (trigger word: {entry.trigger_word or 'none'}) into {entry.folder}")
    elif cmd == "export":
        dest = _library(args, False).export(args.name, args.dest, fmt=args.format)
        print(f"exported {args.name} as {args.format} to {dest}")
    elif cmd == "rename":
        entry = _library(args, False).rename(args.old, args.new)
        print(f"renamed {args.old} to {entry.name}")
    elif cmd == "remove":
        _library(args, False).remove(args.name)
        print(f"removed {args.name}")
    return 0

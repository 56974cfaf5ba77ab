"""Re-create the two example style sets from the `arcade` wheel on PyPI (not a dependency).

    .venv/bin/pip download --no-deps arcade==3.3.3 -d /tmp/arcade
    .venv/bin/python assets/examples/make_examples.py /tmp/arcade/arcade-3.3.3-py3-none-any.whl

kenney_flat/: unmodified CC0 sprites of Kenney's platformer pack (flat cartoon style).
pixel_city/:  pixel-art crops (at native resolution, no resampling) of Luis Zuno's (@ansimuz)
              "Cyberpunk Street" and "Warped Miami Synth" backgrounds, whose licence allows use,
              modification and redistribution.
Each folder gets SOURCE.md (origin and sha256 of every file) and LICENSE.txt.
"""

from __future__ import annotations

import hashlib
import io
import sys
import zipfile
from pathlib import Path

from PIL import Image

HERE = Path(__file__).parent
WHEEL_NAME = "arcade-3.3.3-py3-none-any.whl"
IMG = "arcade/resources/assets/images/"

KENNEY = [f"enemies/{n}.png" for n in ("bee", "fishGreen", "fishPink", "fly", "frog", "ladybug", "mouse", "saw",
                                      "slimeBlue", "wormGreen")] + \
         [f"items/{n}.png" for n in ("coinGold", "gemBlue", "keyRed", "star", "flagGreen1")] + \
         [f"tiles/{n}.png" for n in ("mushroomRed", "cactus", "bush", "boxCrate", "signExit")]

# (output name, source file, crop box left, top, right, bottom) in source pixels
PIXEL = [
    ("street_bar.png", "cybercity_background/foreground.png", 0, 24, 96, 120),
    ("street_restaurant.png", "cybercity_background/foreground.png", 220, 70, 316, 166),
    ("street_tower.png", "cybercity_background/foreground.png", 230, 0, 294, 64),
    ("street_road.png", "cybercity_background/foreground.png", 120, 128, 184, 192),
    ("skyline_far_left.png", "cybercity_background/far-buildings.png", 0, 0, 128, 128),
    ("skyline_far_right.png", "cybercity_background/far-buildings.png", 128, 0, 256, 128),
    ("towers_left.png", "cybercity_background/back-buildings.png", 0, 64, 96, 160),
    ("towers_mid.png", "cybercity_background/back-buildings.png", 80, 20, 176, 116),
    ("towers_right.png", "cybercity_background/back-buildings.png", 160, 40, 256, 136),
    ("synth_buildings.png", "miami_synth_parallax/layers/buildings.png", 60, 40, 188, 168),
    ("synth_palms.png", "miami_synth_parallax/layers/palms.png", 0, 40, 112, 152),
    ("synth_highway.png", "miami_synth_parallax/layers/highway.png", 0, 112, 128, 240),
    ("synth_car.png", "miami_synth_parallax/car/car-idle.png", 0, 0, 184, 68),
    ("street_corner.png", "cybercity_background/foreground.png", 256, 96, 352, 192),
]

KENNEY_LICENSE = "arcade/resources/assets/images/License.txt"
ANSIMUZ_LICENSES = ["cybercity_background/public-license.txt", "miami_synth_parallax/public-license.txt"]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(wheel: Path) -> None:
    zf = zipfile.ZipFile(wheel)
    wheel_sha = sha(wheel.read_bytes())
    head = f"Taken from the `arcade` 3.3.3 wheel on PyPI ({WHEEL_NAME}, sha256 {wheel_sha}).\n\n"

    out = HERE / "kenney_flat"
    out.mkdir(exist_ok=True)
    rows = []
    for rel in KENNEY:
        data = zf.read(IMG + rel)
        name = rel.replace("/", "_")
        (out / name).write_bytes(data)
        rows.append(f"| {name} | {IMG}{rel} | unmodified | {sha(data)} |")
    (out / "LICENSE.txt").write_bytes(zf.read(KENNEY_LICENSE))
    (out / "SOURCE.md").write_text(
        "# kenney_flat: flat cartoon sprites by Kenney (www.kenney.nl), CC0 1.0\n\n" + head +
        "Transparent PNGs; preprocessing composites them on the background colour.\n\n"
        "| file | path inside the wheel | change | sha256 |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")

    out = HERE / "pixel_city"
    out.mkdir(exist_ok=True)
    rows = []
    for name, rel, *box in PIXEL:
        im = Image.open(io.BytesIO(zf.read(IMG + rel)))
        im.load()
        crop = im.convert("RGBA").crop(tuple(box))
        buf = io.BytesIO()
        crop.save(buf, format="PNG", optimize=True)
        (out / name).write_bytes(buf.getvalue())
        rows.append(f"| {name} | {IMG}{rel} | crop {tuple(box)} at native resolution | {sha(buf.getvalue())} |")
    lic = "\n\n---\n\n".join(zf.read(IMG + p).decode() for p in ANSIMUZ_LICENSES)
    (out / "LICENSE.txt").write_text("Pixel art by Luis Zuno (@ansimuz), as shipped in the arcade wheel:\n\n" + lic)
    (out / "SOURCE.md").write_text(
        "# pixel_city: pixel art by Luis Zuno (@ansimuz)\n\n" + head +
        "Originals: https://ansimuz.itch.io/cyberpunk-street-environment and "
        "https://ansimuz.itch.io/warped-miami-synth (licence: use, modify and redistribute, credit "
        "appreciated; see LICENSE.txt).  Each file is a crop of one layer, no resampling.\n\n"
        "| file | path inside the wheel | change | sha256 |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/arcade") / WHEEL_NAME)

"""The page template `dvc plots show` fills, with its charting scripts inline, so it works offline.

DVC's default page loads Vega, Vega-Lite and vega-embed from a CDN: offline it stays blank,
and online it calls out. ``.dvc/config`` points DVC at this template instead
(``plots.html_template``); it holds the three libraries as one script, bundled by the Vega
team's ``vl-convert`` package, and no ``{scripts}`` placeholder, so DVC's CDN tags have
nowhere to go. The template is committed (a fresh clone needs nothing to run
``dvc plots show``); a test checks that it is what this module writes.

    python -m tasks.plots_page        # rewrite .dvc/plots_page.html (after upgrading vl-convert)
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from milora.atomic import atomic_write_text
from tasks import run_command

logger = logging.getLogger(__name__)

TEMPLATE = Path(".dvc") / "plots_page.html"
# DVC's plot templates declare Vega-Lite v5 (dvc_render.vega_templates): bundle the newest v5.
VEGA_LITE_MAJOR = "5."

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega {vega}, vega-lite {vega_lite}, vega-embed {vega_embed}: bundled by vl-convert {vl_convert}
         (python -m tasks.plots_page); nothing is loaded from the network. -->
    <script type="text/javascript">
(function () {{
{bundle}
}})();
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def render_template() -> str:
    """The page, with vega, vega-lite (newest v5) and vega-embed inline."""
    from importlib.metadata import version

    import vl_convert

    vega_lite = max(
        (v for v in vl_convert.get_vegalite_versions() if v.startswith(VEGA_LITE_MAJOR)),
        key=lambda v: tuple(int(part) for part in v.split(".")),
    )
    bundle = vl_convert.javascript_bundle(vl_version=vega_lite)
    if "</script" in bundle.lower():  # would end the inline script early
        bundle = bundle.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")
    return PAGE.format(
        bundle=bundle,
        vega=vl_convert.get_vega_version(),
        vega_lite=vega_lite,
        vega_embed=vl_convert.get_vega_embed_version(),
        vl_convert=version("vl-convert-python"),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.plots_page", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(TEMPLATE), help=f"where to write it (default: {TEMPLATE})")
    args = parser.parse_args(argv)
    page = render_template()
    atomic_write_text(Path(args.out), page)
    logger.info("wrote %s (%d kB)", args.out, len(page) // 1000)
    return 0


if __name__ == "__main__":
    run_command(main)

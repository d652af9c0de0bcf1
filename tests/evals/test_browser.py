"""The report in a real headless Chromium: every grid image decodes, the tables and plots are there."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs the chromium browser (Debian package 'chromium'; .ci/run installs it)"
)

# Runs after the page (and its data-URI images) loaded; writes what it found into the DOM for --dump-dom.
CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = {
    images: imgs.length,
    decoded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; }).length,
    tables: Array.prototype.map.call(document.querySelectorAll('table'), function (t) { return t.className; }),
    svgs: document.querySelectorAll('svg').length,
    failures: document.querySelectorAll('#failures li').length
  };
  var pre = document.createElement('pre');
  pre.id = 'flowalign-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
           *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=90)


def test_images_load_and_tables_render_in_chromium(rich_run, tmp_path):
    page = tmp_path / "checked.html"
    page.write_text(rich_run.html_path.read_text().replace("</body>", CHECK + "</body>"))
    done = _chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri(), profile=tmp_path / "profile")
    match = re.search(r'<pre id="flowalign-check">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the check did not run; chromium said: {done.stderr[-2000:]}"
    found = json.loads(html.unescape(match.group(1)))
    res = rich_run.report["results"]["toy-heldout"]
    cells = sum(1 for row in res["grid"] for files in row["samples"].values() if files)
    assert found["images"] == cells == 3 * 3  # 3 prompts x 3 models
    assert found["decoded"] == found["images"]
    for table in (
        "stats",
        "win-rates",
        "diversity",
        "against-base",
        "grid",
        "calibration",
        "settings",
        "models",
    ):
        assert table in found["tables"], table
    assert found["svgs"] == 2 * len(rich_run.report["dimensions"])  # interval plot + histogram per dimension
    assert found["failures"] == len(rich_run.failures) == 2


def test_screenshot_of_the_report(rich_run, tmp_path):
    from PIL import Image, ImageStat

    shot = tmp_path / "report.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1280,2200", rich_run.html_path.as_uri(),
                     profile=tmp_path / "profile")  # fmt: skip
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 2200)
        spread = ImageStat.Stat(image.convert("L")).stddev[0]
    assert spread > 10  # a rendered page, not a blank one


def test_model_card_renders_with_its_eval_table_in_chromium(toy_dpo_run, rich_run, tmp_path):
    from flowalign.sharing.card import render_card_html
    from flowalign.sharing.push import build_upload_folder

    folder = build_upload_folder(
        toy_dpo_run, tmp_path / "up", repo_id="me/toy-dpo", eval_dir=rich_run.json_path.parent
    )
    page = folder / "card.html"
    html_text = render_card_html((folder / "README.md").read_text(), title="me/toy-dpo")
    page.write_text(html_text.replace("</body>", CHECK + "</body>"))
    done = _chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri(), profile=tmp_path / "profile")
    match = re.search(r'<pre id="flowalign-check">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the check did not run; chromium said: {done.stderr[-2000:]}"
    found = json.loads(html.unescape(match.group(1)))
    assert found["images"] == found["decoded"] == 1  # the sample grid
    assert len(found["tables"]) == 2  # the recipe and the eval table
    dom = html.unescape(done.stdout)
    for model in ("a", "b", "fast <b>"):
        assert f"<td>{model}</td>" in dom or f"<td>{html.escape(model)}</td>" in done.stdout

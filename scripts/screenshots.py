"""Screenshots of the dashboard for the docs: docs/pending.png and docs/detail.png.

Seeds the demo (`flask seed-demo`) into a throwaway SQLite database, lets the demo agent ask
for a few destructive operations, serves the app on a loopback port and photographs the pages
with Playwright driving Debian's Chromium.

    .venv/bin/python scripts/screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEMO_PASSWORD = "countersign-demo"  # noqa: S105  (seed-demo's documented default)


def build_app(workdir: Path):
    """The app on a fresh SQLite file, migrated and seeded with the demo; returns (app, token)."""
    from flask_migrate import upgrade

    from app import create_app

    app = create_app(
        {
            "SQLALCHEMY_DATABASE_URI": f"sqlite:///{workdir / 'demo.sqlite3'}",
            "SECRET_KEY": "screenshots",
        }
    )
    with app.app_context():
        upgrade()
    result = app.test_cli_runner().invoke(args=["seed-demo", "--password", DEMO_PASSWORD])
    if result.exit_code != 0:
        raise SystemExit(f"seed-demo failed:\n{result.output}")
    lines = result.output.strip().splitlines()
    return app, lines[-1].strip()


def ask_for_deletes(app, token: str) -> dict[str, int]:
    """The demo agent asks for three destructive operations (each answered 202)."""
    from sqlalchemy import select

    from app.extensions import db
    from app.models import Workspace

    with app.app_context():
        ids = {ws.name: ws.id for ws in db.session.execute(select(Workspace)).scalars()}
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    asked = {}
    for name, path in [
        ("staging", f"/api/workspaces/{ids['staging']}"),
        ("secret", f"/api/workspaces/{ids['payments-api']}/secrets/STRIPE_KEY"),
        ("production", f"/api/workspaces/{ids['production']}?recursive=true"),
    ]:
        response = client.delete(path, headers=headers)
        if response.status_code != 202:
            raise SystemExit(f"expected 202 for {path}, got {response.status_code}")
        asked[name] = response.get_json()["approval_id"]
    return asked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs"), help="directory for the PNGs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from playwright.sync_api import expect, sync_playwright
    from werkzeug.serving import make_server

    from tests.e2e.support import CHROMIUM, CHROMIUM_ARGS

    with tempfile.TemporaryDirectory() as tmp:
        app, token = build_app(Path(tmp))
        asked = ask_for_deletes(app, token)
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        base_url = f"http://127.0.0.1:{server.server_port}"
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
                )
                context = browser.new_context(
                    base_url=base_url, viewport={"width": 1280, "height": 860}
                )
                page = context.new_page()
                page.goto("/login")
                page.fill("input[name=username]", "alice")
                page.fill("input[name=password]", DEMO_PASSWORD)
                page.click("button:has-text('Log in')")
                expect(page.locator("#live-status")).to_have_attribute("data-live", "live")
                expect(page.locator(f"#approval-{asked['production']}")).to_be_visible()
                page.screenshot(
                    path=str(out / "pending.png"), full_page=True, animations="disabled"
                )
                page.goto(f"/approvals/{asked['production']}")
                expect(page.locator("#live-status")).to_have_attribute("data-live", "live")
                page.screenshot(path=str(out / "detail.png"), full_page=True, animations="disabled")
                context.close()
                browser.close()
        finally:
            server.shutdown()
            thread.join(timeout=10)
            app.extensions["countersign_events"].stop()
    print(f"wrote {out / 'pending.png'} and {out / 'detail.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Summarise a py-spy speedscope profile: where the CPU time of the gunicorn workers goes.

Recorded with ``py-spy record --gil``: only the thread holding the GIL is sampled, so the shares
below are shares of the workers' Python CPU time (waiting on PostgreSQL releases the GIL).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Frames outside the app are grouped by their top-level package (site-packages) or, for the
# standard library, by a few modules worth naming; some packages are reported with a friend.
ALIASES = {
    "limits": "flask_limiter",
    "pythonjsonlogger": "logging",
    "simple_websocket": "websocket",
}
STDLIB = (("/logging/", "logging"), ("/json/", "json"), ("/http/", "http"), ("/email/", "email"))
# Packages whose frames name the framework work no app frame asked for (teardown, routing, ...).
FRAMEWORK = ("flask_sqlalchemy", "flask_limiter", "flask_wtf", "flask", "werkzeug", "gunicorn")


def package_of(filename: str, app_dir: str) -> str:
    if filename.startswith(app_dir):
        return "app"
    if "site-packages/" in filename:
        top = filename.split("site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
        return ALIASES.get(top, top)
    for needle, name in STDLIB:
        if needle in filename:
            return name
    return "stdlib/other"


def summarise(path: Path, app_dir: str, top: int = 5) -> dict[str, Any]:
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    labels = []
    for frame in frames:
        filename = frame.get("file") or ""
        short = filename[len(app_dir) :] if filename.startswith(app_dir) else Path(filename).name
        labels.append((frame["name"], filename, short, frame.get("line")))
    total = 0.0
    self_time: Counter[str] = Counter()
    by_package: Counter[str] = Counter()
    by_app_site: Counter[str] = Counter()
    inclusive_app: Counter[str] = Counter()
    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            if not stack:
                continue
            total += weight
            name, filename, short, _ = labels[stack[-1]]
            leaf_package = package_of(filename, app_dir)
            self_time[f"{name} ({short})"] += weight
            by_package[leaf_package] += weight
            # The innermost app frame is the app code that asked for this work.
            site = None
            for index in reversed(stack):
                f_name, f_file, f_short, _ = labels[index]
                if f_file.startswith(app_dir):
                    site = f"{f_short.removesuffix('.py').replace('/', '.')}.{f_name}"
                    break
            if site is None:  # framework work around the views: name its innermost entry
                for index in reversed(stack):
                    f_name, f_file, _, _ = labels[index]
                    package = package_of(f_file, app_dir)
                    if package in FRAMEWORK:
                        site = f"(framework) {package} {f_name}"
                        break
                else:
                    site = "(incomplete stack: py-spy could not unwind it)"
            by_app_site[f"{site} -> {leaf_package}"] += weight
            seen = set()
            for index in stack:
                f_name, f_file, f_short, _ = labels[index]
                if f_file.startswith(app_dir):
                    key = f"{f_short.removesuffix('.py').replace('/', '.')}.{f_name}"
                    if key not in seen:
                        seen.add(key)
                        inclusive_app[key] += weight

    def share(counter: Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {"what": key, "share": round(value / total, 3)} for key, value in counter.most_common(n)
        ]

    return {
        "sampled_seconds": round(total, 1),
        "top_costs": [
            entry
            for entry in share(by_app_site, top + 5)
            if not entry["what"].startswith("(incomplete")
        ][:top],
        "unattributed_share": round(
            sum(v for k, v in by_app_site.items() if k.startswith("(incomplete")) / total, 3
        ),
        "by_package_self": share(by_package, 12),
        "top_self": share(self_time, 12),
        "top_inclusive_app": share(inclusive_app, 15),
        "how": "py-spy --gil samples (the thread holding the GIL: Python CPU time) of both "
        "workers; top_costs attributes each sample to the innermost app function on its stack "
        "and the library the sample was in",
    }


if __name__ == "__main__":
    root = str(Path(__file__).absolute().parent.parent / "app") + "/"
    print(json.dumps(summarise(Path(sys.argv[1]), root), indent=2))

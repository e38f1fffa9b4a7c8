# The two commands: `make run` serves the demo, `make test` runs the whole suite.
.PHONY: run test lint bench

run:
	scripts/run.sh

test:
	scripts/test.sh

lint:
	.venv/bin/ruff check .

bench:
	scripts/bench.sh

# The two commands of the README. Both set up .venv on first use.
.PHONY: demo test setup clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@.venv/bin/mriseg demo

test: setup
	@bash scripts/test.sh

clean:
	rm -rf .venv .pytest_cache

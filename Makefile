# The two commands of the README. Both set up .venv on first use.
.PHONY: demo test setup audit clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@.venv/bin/mriseg demo

test: setup
	@bash scripts/test.sh

audit:
	@bash scripts/audit.sh

clean:
	rm -rf .venv .pytest_cache

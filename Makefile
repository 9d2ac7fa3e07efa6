# The two commands of the README. Both set up .venv on first use.
.PHONY: demo test test-training test-deep setup audit clean

setup:
	@bash scripts/bootstrap.sh

demo: setup
	@.venv/bin/mriseg demo

test: setup
	@bash scripts/test.sh

# what `make test` leaves out: the demo-model training tests, and the deep fuzz run (it grows the corpus
# that `make test` replays; MRISEG_FUZZ_SECONDS sets its length)
test-training: setup
	@bash scripts/test.sh -m training training/tests

test-deep: setup
	@bash scripts/test.sh -m deep

audit:
	@bash scripts/audit.sh

clean:
	rm -rf .venv .pytest_cache

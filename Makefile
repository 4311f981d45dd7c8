# One command per task. Run inside a venv: `make install` first.
PYTHON ?= python

.PHONY: install format lint test cov

install:
	$(PYTHON) -m pip install -e '.[dev]'

format:
	ruff check --select I --fix .  # import order is formatting too
	ruff format .

lint:
	ruff format --check .
	ruff check .
	mypy --strict hub

# The README's test command; tests start their own Redis servers.
test:
	PYTHONASYNCIODEBUG=1 $(PYTHON) -m pytest

cov:
	PYTHONASYNCIODEBUG=1 $(PYTHON) -m coverage run --branch --source=hub -m pytest
	$(PYTHON) -m coverage report --show-missing

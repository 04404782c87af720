# blocklm developer targets. PY is the interpreter of the environment to use (a venv's python).
PY ?= python3
CORPORA ?= ../shared/corpora
SHARDS ?= data/shards

.PHONY: install test lint shards bench

# torch first, pinned to the CPU wheel, so no dependency can pull another torch build.
# constraints.txt pins the whole dependency set to versions known to work together (it also pins
# torch), so a fresh install never backtracks through the resolver; refresh it with
# `pip freeze --exclude-editable > constraints.txt` in a working environment.
install:
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e '.[dev]'

test:
	$(PY) -m pytest -q

lint:
	$(PY) -m ruff check .

shards:
	$(PY) -m blocklm.tools.make_shards --corpora $(CORPORA) --out $(SHARDS)

# One line per benchmark; each prints its table with its baseline measured in the same run.
# The GPU benchmark needs CUDA: run `blocktool bench gpu` on a GPU machine.
bench: shards
	$(PY) -m blocklm.tools.cli bench convert $(CORPORA)/images $(CORPORA)/audio
	$(PY) -m blocklm.tools.cli bench read $(SHARDS)/text $(SHARDS)/images $(SHARDS)/audio $(SHARDS)/mixed
	$(PY) -m blocklm.tools.cli bench dispatch $(SHARDS)/mixed
	$(PY) -m blocklm.tools.cli bench model --quick

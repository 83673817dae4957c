# reals: every target is safe to re-run; finished artifacts are reused.
VENV   ?= .venv
PY     := $(VENV)/bin/python
REALS  := $(VENV)/bin/reals
DEVICE ?= auto
export REALS_HOME ?= $(HOME)/.cache/reals
# Tests reuse the assets `make assets` fetched instead of fetching their own copy.
export REALS_TEST_HOME ?= $(REALS_HOME)

.PHONY: install assets test demo bench clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

assets: install
	$(REALS) assets fetch

test: install assets
	$(VENV)/bin/pytest -q

# The demo: Fashion-MNIST at 32 px, VGG16 teacher, CPU. Every step writes an artifact with a
# manifest, which make's dependency tracking reuses; a failed step stops the chain with its
# own one-line error. SCALE multiplies the training budgets (SCALE=10 DEVICE=cuda on a GPU).
DEMO  := runs/demo
SCALE ?= 1
R      = $(REALS) --device $(DEVICE)
mul    = $(shell echo $$(( $(1) * $(SCALE) )))

$(DEMO)/data/manifest.json: | install assets
	$(REALS) data fashion-mnist $(DEMO)/data --size 32 --limit 10000

$(DEMO)/vae/manifest.json: $(DEMO)/data/manifest.json
	$(REALS) train-vae --preset demo --device $(DEVICE) --steps $(call mul,200) --out $(DEMO)/vae

$(DEMO)/vae-baseline/manifest.json: $(DEMO)/data/manifest.json
	$(REALS) train-vae --preset demo --device $(DEVICE) --steps $(call mul,200) --align-weight 0 --out $(DEMO)/vae-baseline

$(DEMO)/latents.zarr/zarr.json: $(DEMO)/vae/manifest.json
	$(REALS) encode $(DEMO)/data/train $(DEMO)/latents.zarr --vae $(DEMO)/vae --device $(DEVICE)

$(DEMO)/sit/manifest.json: $(DEMO)/latents.zarr/zarr.json
	$(REALS) train-dit $(DEMO)/latents.zarr --model SiT-T/2 --batch-size 128 --lr 4e-4 --ema-decay 0.99 \
	  --steps $(call mul,300) --log-every 20 --ckpt-every 100 --sample-every 100 --workers 1 --device $(DEVICE) --out $(DEMO)/sit

$(DEMO)/samples/manifest.json: $(DEMO)/sit/manifest.json
	$(REALS) sample --ckpt $(DEMO)/sit --cfg 2.0 --sampler ode --ode-method heun --steps 21 -n $(call mul,500) \
	  --batch-size 250 --device $(DEVICE) --out $(DEMO)/samples

# FID reference: 1,000 test images (Inception at 299 px is slow on a CPU).
$(DEMO)/fid-ref/manifest.json: | install assets
	$(REALS) data fashion-mnist $(DEMO)/fid-ref --size 32 --limit 1000

$(DEMO)/fid.json: $(DEMO)/samples/manifest.json $(DEMO)/fid-ref/manifest.json
	$(REALS) eval-fid $(DEMO)/samples --ref $(DEMO)/fid-ref/test --device $(DEVICE) --out $@

$(DEMO)/seg/manifest.json: $(DEMO)/vae/manifest.json
	$(REALS) probe-seg fit --data $(DEMO)/data --limit 2000 --vae $(DEMO)/vae --device $(DEVICE) --out $(DEMO)/seg

$(DEMO)/seg/eval-test/metrics.json: $(DEMO)/seg/manifest.json $(DEMO)/vae-baseline/manifest.json $(DEMO)/samples/manifest.json
	$(REALS) probe-seg eval --data $(DEMO)/data --limit 1000 --vae $(DEMO)/vae --head $(DEMO)/seg \
	  --baseline-vae $(DEMO)/vae-baseline --latents $(DEMO)/samples/latents.zarr --device $(DEVICE)

$(DEMO)/depth/manifest.json: $(DEMO)/vae/manifest.json
	$(REALS) probe-depth fit --data motorcycle --vae $(DEMO)/vae --device $(DEVICE) --out $(DEMO)/depth

$(DEMO)/depth/eval-test/metrics.json: $(DEMO)/depth/manifest.json $(DEMO)/vae-baseline/manifest.json
	$(REALS) probe-depth eval --data motorcycle --vae $(DEMO)/vae --head $(DEMO)/depth \
	  --baseline-vae $(DEMO)/vae-baseline --device $(DEVICE)

demo: $(DEMO)/fid.json $(DEMO)/seg/eval-test/metrics.json $(DEMO)/depth/eval-test/metrics.json

bench: install assets
	$(PY) -m reals_cli.bench --out docs/benchmarks.md

clean-demo:
	rm -rf $(DEMO)

# reals: every target is safe to re-run; finished artifacts are reused, and a step that was
# interrupted (Ctrl-C, SIGTERM, a kill) continues where it stopped: the trainers take
# --auto-resume, and encode, sample and the data exports resume by themselves.
VENV   ?= .venv
PY     := $(VENV)/bin/python
REALS  := $(VENV)/bin/reals
DEVICE ?= auto
export REALS_HOME ?= $(HOME)/.cache/reals
# Tests reuse the assets `make assets` fetched instead of fetching their own copy.
export REALS_TEST_HOME ?= $(REALS_HOME)

.PHONY: install assets test demo repro-small kl-sweep bench gpu-wheels gpu-check clean-demo

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
# own one-line error. SCALE multiplies the training and sampling budgets (SCALE=10 DEVICE=cuda
# on a GPU). Layout (what `reals report` reads): $(DEMO)/<variant>/{vae,latents.zarr,sit,
# samples,fid.json,...} for the variants `reals` (aligned) and `baseline` (--align-weight 0).
DEMO  := runs/demo
SCALE ?= 1
CFG   ?= 2.0
R      = $(REALS) --device $(DEVICE)
mul    = $(shell echo $$(( $(1) * $(SCALE) )))
VAE_FLAGS    = --preset demo --extra-data $(DEMO)/photos --steps $(call mul,150) --device $(DEVICE) --auto-resume
SIT_FLAGS    = --model SiT-T/2 --batch-size 128 --lr 4e-4 --ema-decay 0.99 --steps $(call mul,300) --log-every 20 \
               --ckpt-every 100 --sample-every 100 --workers 1 --device $(DEVICE) --auto-resume
SAMPLE_FLAGS = --sampler ode --ode-method heun --steps 21 -n $(call mul,500) --batch-size 250 --device $(DEVICE)
FID_REF      = $(DEMO)/fid-ref/stats.npz

$(DEMO)/data/manifest.json: | install assets
	$(REALS) data fashion-mnist $(DEMO)/data --size 32 --limit 10000

# Natural-image tiles beside Fashion-MNIST, so that the VAEs have seen photographs at the
# scale the depth probe reads (the motorcycle's depth test columns are not among them).
$(DEMO)/photos/manifest.json: | install assets
	$(REALS) data photos $(DEMO)/photos --size 32

$(DEMO)/reals/vae/manifest.json: $(DEMO)/data/manifest.json $(DEMO)/photos/manifest.json
	$(REALS) train-vae $(VAE_FLAGS) --out $(@D)

$(DEMO)/baseline/vae/manifest.json: $(DEMO)/data/manifest.json $(DEMO)/photos/manifest.json
	$(REALS) train-vae $(VAE_FLAGS) --align-weight 0 --out $(@D)

# One recipe for every variant (reals, baseline, the KL sweep's): the same SiT budget on each.
%/latents.zarr/zarr.json: %/vae/manifest.json
	$(REALS) encode $(DEMO)/data/train $*/latents.zarr --vae $*/vae --device $(DEVICE)

%/sit/manifest.json: %/latents.zarr/zarr.json
	$(REALS) train-dit $*/latents.zarr $(SIT_FLAGS) --out $*/sit

%/samples/manifest.json: %/sit/manifest.json
	$(REALS) sample --ckpt $*/sit --cfg $(CFG) $(SAMPLE_FLAGS) --out $*/samples

%/samples-nocfg/manifest.json: %/sit/manifest.json
	$(REALS) sample --ckpt $*/sit --cfg 1.0 $(SAMPLE_FLAGS) --out $*/samples-nocfg

%/fid.json: %/samples/manifest.json $(FID_REF)
	$(REALS) eval-fid $*/samples --ref $(FID_REF) --device $(DEVICE) --out $@

%/fid-nocfg.json: %/samples-nocfg/manifest.json $(FID_REF)
	$(REALS) eval-fid $*/samples-nocfg --ref $(FID_REF) --device $(DEVICE) --out $@

%/analysis/analysis.json: %/latents.zarr/zarr.json
	$(REALS) analyze $*/latents.zarr --out $*/analysis

# FID reference: 500 test images (Inception at 299 px is slow on a CPU), their statistics
# computed once for every evaluation.
$(FID_REF): | install assets
	$(REALS) data fashion-mnist $(DEMO)/fid-ref --size 32 --limit 500
	$(REALS) eval-fid --ref $(DEMO)/fid-ref/test --ref-size 32 --device $(DEVICE) --save-ref-stats $@

$(DEMO)/seg/manifest.json: $(DEMO)/reals/vae/manifest.json
	$(REALS) probe-seg fit --data $(DEMO)/data --limit 1000 --vae $(DEMO)/reals/vae --device $(DEVICE) --out $(DEMO)/seg

$(DEMO)/seg/eval-test/manifest.json: $(DEMO)/seg/manifest.json $(DEMO)/baseline/vae/manifest.json $(DEMO)/reals/samples/manifest.json
	$(REALS) probe-seg eval --data $(DEMO)/data --limit 1000 --vae $(DEMO)/reals/vae --head $(DEMO)/seg \
	  --baseline-vae $(DEMO)/baseline/vae --latents $(DEMO)/reals/samples/latents.zarr --device $(DEVICE)

$(DEMO)/depth/manifest.json: $(DEMO)/reals/vae/manifest.json
	$(REALS) probe-depth fit --data motorcycle --vae $(DEMO)/reals/vae --device $(DEVICE) --out $(DEMO)/depth

$(DEMO)/depth/eval-test/manifest.json: $(DEMO)/depth/manifest.json $(DEMO)/baseline/vae/manifest.json
	$(REALS) probe-depth eval --data motorcycle --vae $(DEMO)/reals/vae --head $(DEMO)/depth \
	  --baseline-vae $(DEMO)/baseline/vae --device $(DEVICE)

DEMO_STEPS = $(DEMO)/reals/fid.json $(DEMO)/reals/analysis/analysis.json $(DEMO)/baseline/analysis/analysis.json \
             $(DEMO)/seg/eval-test/manifest.json $(DEMO)/depth/eval-test/manifest.json

# The report is cheap: rewritten (only if it changed) and its table printed on every run.
DEMO_NOTE = A single-seed miniature (one VAE and one SiT-T/2 per variant, FID over 500 samples): its budget is too \
  small to tell ReaLS from the baseline, and reruns have come out in either order. The powered comparison, with \
  seeds and intervals, is make repro (docs/reproduction.md).
demo: $(DEMO_STEPS)
	$(REALS) report $(DEMO) --title "ReaLS demo: Fashion-MNIST, VGG16 teacher" --note "$(DEMO_NOTE)"

# The paper's control experiment in miniature: the baseline VAE gets the same SiT budget as
# ReaLS, both are sampled with and without guidance, and the table goes to docs/.
repro-small: $(DEMO_STEPS) $(foreach v,reals baseline,$(DEMO)/$(v)/fid.json $(DEMO)/$(v)/fid-nocfg.json)
	$(REALS) report $(DEMO) --title "ReaLS demo: Fashion-MNIST, VGG16 teacher" --note "$(DEMO_NOTE)"
	$(REALS) report $(DEMO) --out docs/repro-small.md --title "repro-small: the baseline VAE against ReaLS" --note "$(DEMO_NOTE)"


# The powered comparison (issue 18): the baseline VAE (--align-weight 0) and the ReaLS VAE trained
# on rendered shapes (`reals data shapes`: in-domain depth and segmentation), then the same SiT
# budget on each latent space with every seed in REPRO_SEEDS, each kept step (every REPRO_KEEP
# steps) sampled with REPRO_N samples and scored by Inception FID against the test split and by a
# classifier trained on the train split. The protocol is written first, from these variables, and
# a run with other values is refused: change REPRO (a new experiment) instead. The page and JSON
# gather every seed (means, 95% t-intervals, FID against SiT step). The sizes below are the plan;
# e.g. `make repro REPRO=/tmp/r REPRO_DOC=/tmp/r/doc REPRO_COUNT=64 REPRO_TEST_COUNT=16
# REPRO_VAE_STEPS=2 REPRO_SIT_STEPS=4 REPRO_KEEP=2 REPRO_N=16 REPRO_SEEDS="0 1" REPRO_SIT_BATCH=16
# REPRO_CLF_EPOCHS=1 REPRO_PROBE_LIMIT=16` is a minutes-long pass through every step.
REPRO            ?= runs/repro
REPRO_DOC        ?= docs/reproduction
REPRO_SEEDS      ?= 0 1 2
REPRO_COUNT      ?= 10000
REPRO_TEST_COUNT ?= 2000
REPRO_VAE_STEPS  ?= 400
# A second VAE seed is a second experiment (REPRO=runs/repro-vae1 REPRO_VAE_SEED=1): its VAEs, latents and SiTs.
REPRO_VAE_SEED   ?= 0
REPRO_SIT_STEPS  ?= 400
REPRO_KEEP       ?= 400
# Inception at 299 px costs more on a CPU than the SiTs: it scores the final step only, and the
# classifier (cheap) draws the convergence curve over every kept step.
REPRO_FID_STEPS  ?= $(REPRO_SIT_STEPS)
REPRO_SIT_BATCH  ?= 128
REPRO_N          ?= 2000
REPRO_CLF_EPOCHS ?= 5
REPRO_PROBE_LIMIT ?= 1000
REPRO_VARIANTS   := baseline reals
REPRO_KEPT        = $(shell seq $(REPRO_KEEP) $(REPRO_KEEP) $(REPRO_SIT_STEPS))
REPRO_FINAL       = $(shell printf %07d $(lastword $(REPRO_KEPT)))
REPRO_FID_REF     = $(REPRO)/fid-ref/stats.npz
VAE_RECIPE        = --preset demo --data $(REPRO)/data --steps $(REPRO_VAE_STEPS) --val-every 50 --teacher-cache-gb 4 --device $(DEVICE) --auto-resume
REPRO_VAE_FLAGS   = $(VAE_RECIPE) --seed $(REPRO_VAE_SEED)
REPRO_SIT_FLAGS   = --model SiT-T/2 --batch-size $(REPRO_SIT_BATCH) --lr 4e-4 --ema-decay 0.99 --steps $(REPRO_SIT_STEPS) \
                    --keep-every $(REPRO_KEEP) --log-every 20 --ckpt-every $(REPRO_KEEP) --sample-every 0 --workers 1 \
                    --device $(DEVICE) --auto-resume
REPRO_SAMPLE_FLAGS = --sampler ode --ode-method heun --steps 21 -n $(REPRO_N) --batch-size 250 --device $(DEVICE)
empty :=
comma := ,
json_list = [$(subst $(empty) $(empty),$(comma),$(strip $(1)))]

# Written before the first run, and checked again before every training run and before the results are
# gathered: `reals reproduction protocol` refuses a protocol that differs from the one on disk.
# The SiT side of a protocol, shared by make repro and make repa: seeds, kept steps, sampling and scoring.
SIT_PROTOCOL = seeds=$(call json_list,$(REPRO_SEEDS)) steps=$(call json_list,$(REPRO_KEPT)) \
  fid_steps=$(call json_list,$(REPRO_FID_STEPS)) fid_samples=$(REPRO_N) primary=fid \
  'secondary=["classifier_fd","class_accuracy"]' 'sit="SiT-T/2"' sit_batch=$(REPRO_SIT_BATCH) sit_steps=$(REPRO_SIT_STEPS) \
  cfg=$(CFG) 'sampler="ode heun 21 steps, sample seed = SiT seed"' 'tuned_on_test="nothing: the test split only scores"'
REPRO_PROTOCOL = $(REALS) reproduction protocol $(REPRO) 'variants=["baseline","reals"]' $(SIT_PROTOCOL) \
  dataset=shapes data_seed=0 train_images=$(REPRO_COUNT) fid_reference=$(REPRO_TEST_COUNT) 'fid_reference_split="test"' \
  vae_seed=$(REPRO_VAE_SEED) vae_steps=$(REPRO_VAE_STEPS) \
  'vae_recipe="train-vae --preset demo (VGG16 teacher); baseline: --align-weight 0"' classifier_epochs=$(REPRO_CLF_EPOCHS)


$(REPRO)/data/manifest.json: | install assets
	$(REPRO_PROTOCOL)
	$(REALS) data shapes $(REPRO)/data --size 32 --count $(REPRO_COUNT) --test-count $(REPRO_TEST_COUNT) --seed 0

$(REPRO)/%/vae/manifest.json: $(REPRO)/data/manifest.json
	$(REPRO_PROTOCOL)
	$(REALS) train-vae $(REPRO_VAE_FLAGS) $(if $(filter baseline,$*),--align-weight 0) --out $(@D)

$(REPRO)/%/latents.zarr/zarr.json: $(REPRO)/%/vae/manifest.json
	$(REALS) encode $(REPRO)/data/train $(REPRO)/$*/latents.zarr --vae $(REPRO)/$*/vae --device $(DEVICE)

$(REPRO_FID_REF): $(REPRO)/data/manifest.json
	$(REALS) eval-fid --ref $(REPRO)/data/test --ref-size 32 --device $(DEVICE) --save-ref-stats $@

$(REPRO)/classifier/manifest.json: $(REPRO)/data/manifest.json
	$(REALS) classifier fit $(REPRO)/data --epochs $(REPRO_CLF_EPOCHS) --device $(DEVICE) --out $(@D)

# One SiT of variant $(1), seed $(2) under experiment root $(3), whose protocol command is $$($(4)).
define repro_sit
$(3)/$(1)/sit-s$(2)/manifest.json: $(3)/$(1)/latents.zarr/zarr.json
	$$($(4))
	$(REALS) train-dit $(3)/$(1)/latents.zarr $(REPRO_SIT_FLAGS) --seed $(2) --out $$(@D)
endef
# A kept SiT step of variant $(1), seed $(2), step $(3) under experiment root $(4): sampled, then scored.
define repro_step
$(4)/$(1)/s$(2)/step-$(3)/samples/manifest.json: $(4)/$(1)/sit-s$(2)/manifest.json
	$(REALS) sample --ckpt $(4)/$(1)/sit-s$(2)/step-$(3) --cfg $(CFG) $(REPRO_SAMPLE_FLAGS) --seed $(2) --out $$(@D)
$(4)/$(1)/s$(2)/step-$(3)/fid.json: $(4)/$(1)/s$(2)/step-$(3)/samples/manifest.json $(REPRO_FID_REF)
	$(REALS) eval-fid $$(<D) --ref $(REPRO_FID_REF) --metrics fid,sfid,kid,pr --device $(DEVICE) --out $$@
$(4)/$(1)/s$(2)/step-$(3)/classifier.json: $(4)/$(1)/s$(2)/step-$(3)/samples/manifest.json $(REPRO)/classifier/manifest.json
	$(REALS) classifier eval $$(<D) --classifier $(REPRO)/classifier --ref $(REPRO)/data/test --device $(DEVICE) --out $$@
endef
$(foreach v,$(REPRO_VARIANTS),$(foreach s,$(REPRO_SEEDS),$(eval $(call repro_sit,$(v),$(s),$(REPRO),REPRO_PROTOCOL))\
  $(foreach k,$(REPRO_KEPT),$(eval $(call repro_step,$(v),$(s),$(shell printf %07d $(k)),$(REPRO))))))
step_results = $(foreach v,$(2),$(foreach s,$(REPRO_SEEDS),\
  $(foreach k,$(REPRO_KEPT),$(1)/$(v)/s$(s)/step-$(shell printf %07d $(k))/classifier.json)\
  $(foreach k,$(REPRO_FID_STEPS),$(1)/$(v)/s$(s)/step-$(shell printf %07d $(k))/fid.json)))
REPRO_RESULTS = $(call step_results,$(REPRO),$(REPRO_VARIANTS))

# Depth and segmentation in the VAEs' own domain: heads fitted on teacher features of the shapes'
# train split, scored through each VAE's alignment network on the test split, and on the latents
# each variant's first-seed final SiT generated (against the teacher on their decoded images).
repro_latents = $(REPRO)/$(1)/s$(firstword $(REPRO_SEEDS))/step-$(REPRO_FINAL)/samples
$(REPRO)/seg/manifest.json $(REPRO)/depth/manifest.json: $(REPRO)/%/manifest.json: $(REPRO)/reals/vae/manifest.json
	$(REALS) probe-$(if $(filter seg,$*),seg,depth) fit --data $(REPRO)/data $(if $(filter depth,$*),--format png) \
	  --limit $(REPRO_PROBE_LIMIT) --vae $(REPRO)/reals/vae --device $(DEVICE) --out $(REPRO)/$*
$(REPRO)/seg/eval-test/manifest.json $(REPRO)/depth/eval-test/manifest.json: $(REPRO)/%/eval-test/manifest.json: \
  $(REPRO)/%/manifest.json $(REPRO)/baseline/vae/manifest.json $(foreach v,$(REPRO_VARIANTS),$(call repro_latents,$(v))/manifest.json)
	$(REALS) probe-$* eval --data $(REPRO)/data $(if $(filter depth,$*),--format png) --limit $(REPRO_PROBE_LIMIT) \
	  --vae $(REPRO)/reals/vae --head $(REPRO)/$* --baseline-vae $(REPRO)/baseline/vae \
	  --latents $(call repro_latents,reals)/latents.zarr --baseline-latents $(call repro_latents,baseline)/latents.zarr \
	  --device $(DEVICE)

.PHONY: repro
repro: $(REPRO_RESULTS) $(REPRO)/seg/eval-test/manifest.json $(REPRO)/depth/eval-test/manifest.json
	$(REPRO_PROTOCOL)
	$(REALS) reproduction collect $(REPRO) --json $(REPRO_DOC).json --md $(REPRO_DOC).md \
	  --title "repro: the baseline VAE against ReaLS, $(words $(REPRO_SEEDS)) SiT seeds each"

# ReaLS + REPA (the paper's suggested next step) against ReaLS alone: make repro's SiT budget,
# seeds and scoring on make repro's ReaLS latents, with REPA's loss on block REPA_DEPTH's tokens
# against the ReaLS alignment network's features of the clean latent (--repa-vae). ReaLS alone is
# make repro's own runs, linked in; the page is docs/repa.{md,json}.
REPA        ?= runs/repa
REPA_DOC    ?= docs/repa
REPA_WEIGHT ?= 0.5
REPA_DEPTH  ?= 2
REPA_PROTOCOL = $(REALS) reproduction protocol $(REPA) 'variants=["reals","reals-repa"]' 'compare=["reals","reals-repa"]' \
  $(SIT_PROTOCOL) 'latents="$(REPRO)/reals/latents.zarr"' repa_weight=$(REPA_WEIGHT) repa_depth=$(REPA_DEPTH)
$(REPA)/reals/vae/manifest.json: $(REPRO)/reals/vae/manifest.json
	mkdir -p $(REPA) && ln -sfn $(abspath $(REPRO))/reals $(REPA)/reals
define repa_sit
$(REPA)/reals-repa/sit-s$(1)/manifest.json: $(REPRO)/reals/latents.zarr/zarr.json
	$$(REPA_PROTOCOL)
	$(REALS) train-dit $(REPRO)/reals/latents.zarr $(REPRO_SIT_FLAGS) --repa-weight $(REPA_WEIGHT) --repa-depth $(REPA_DEPTH) \
	  --repa-vae $(REPRO)/reals/vae --seed $(1) --out $$(@D)
endef
$(foreach s,$(REPRO_SEEDS),$(eval $(call repa_sit,$(s)))\
  $(foreach k,$(REPRO_KEPT),$(eval $(call repro_step,reals-repa,$(s),$(shell printf %07d $(k)),$(REPA)))))

.PHONY: repa
repa: $(REPA)/reals/vae/manifest.json $(call step_results,$(REPRO),reals) $(call step_results,$(REPA),reals-repa)
	$(REPA_PROTOCOL)
	$(REALS) reproduction collect $(REPA) --json $(REPA_DOC).json --md $(REPA_DOC).md \
	  --title "repa: ReaLS + REPA (weight $(REPA_WEIGHT), block $(REPA_DEPTH)) against ReaLS, $(words $(REPRO_SEEDS)) SiT seeds each"

# The paper's Figure 5 on make repro's protocol: ReaLS VAEs that differ only in the KL weight,
# each with make repro's SiT budget, seeds and scoring. The 1e-6 point (train-vae's default, LDM's)
# is make repro's own ReaLS, linked in. `--kl` is LDM's kl_weight on the summed KL (docs/train-vae.md):
# at make repro's budget the ReaLS VAE's KL is about 1.2 nats per pixel, so below 1e-2 the term adds
# under 1% to a loss near 0.8 and cannot move the latents; KLS spans from there to where it binds.
KL_SWEEP ?= runs/kl-sweep
KL_DOC   ?= docs/kl-sweep
KLS      ?= 1e-2 1e-1 1
KL_VARIANTS = kl1e-6 $(foreach k,$(KLS),kl$(k))
KL_PROTOCOL = $(REALS) reproduction protocol $(KL_SWEEP) 'variants=$(call json_list,$(foreach v,$(KL_VARIANTS),"$(v)"))' \
  $(SIT_PROTOCOL) 'data="$(REPRO)/data"' vae_seed=$(REPRO_VAE_SEED) vae_steps=$(REPRO_VAE_STEPS) \
  'vae_recipe="make repro'"'"'s ReaLS VAE with --kl <weight>; kl1e-6 is make repro'"'"'s own"'
$(KL_SWEEP)/kl1e-6/vae/manifest.json: $(REPRO)/reals/vae/manifest.json
	mkdir -p $(KL_SWEEP) && ln -sfn $(abspath $(REPRO))/reals $(KL_SWEEP)/kl1e-6
$(KL_SWEEP)/kl%/vae/manifest.json: $(REPRO)/data/manifest.json
	$(KL_PROTOCOL)
	$(REALS) train-vae $(REPRO_VAE_FLAGS) --kl $* --out $(@D)
$(KL_SWEEP)/%/latents.zarr/zarr.json: $(KL_SWEEP)/%/vae/manifest.json
	$(REALS) encode $(REPRO)/data/train $(KL_SWEEP)/$*/latents.zarr --vae $(KL_SWEEP)/$*/vae --device $(DEVICE)
$(foreach v,$(filter-out kl1e-6,$(KL_VARIANTS)),$(foreach s,$(REPRO_SEEDS),$(eval $(call repro_sit,$(v),$(s),$(KL_SWEEP),KL_PROTOCOL))\
  $(foreach k,$(REPRO_KEPT),$(eval $(call repro_step,$(v),$(s),$(shell printf %07d $(k)),$(KL_SWEEP))))))

kl-sweep: $(KL_SWEEP)/kl1e-6/vae/manifest.json $(call step_results,$(REPRO),reals) \
  $(call step_results,$(KL_SWEEP),$(filter-out kl1e-6,$(KL_VARIANTS)))
	$(KL_PROTOCOL)
	$(REALS) reproduction collect $(KL_SWEEP) --json $(KL_DOC).json --md $(KL_DOC).md \
	  --title "kl-sweep: the KL weight against latent std and FID, $(words $(REPRO_SEEDS)) SiT seeds each"

# What the VAE recipe does to the latents, at make repro's VAE budget and on its data: the
# alignment weight (0 and 1 are make repro's own VAEs, linked; VAE seed 1 is `make repro
# REPRO=$(REPRO)-vae1 REPRO_VAE_SEED=1`'s), VA-VAE's adaptive balance, and 8 latent channels
# instead of 4 (does segmentation lack numbers per latent position?). Each VAE is scored by
# its validation (PSNR, LPIPS, alignment cosines) and by make repro's seg and depth heads read
# through its alignment network on the test split; the page is docs/ablations.md.
ABL        ?= runs/ablations
ABL_SEEDS  ?= 0
ABL_RUNS   := latent8:--latent-channels=8 align0.3:--align-weight=0.3 align3:--align-weight=3 adaptive:--align-balance=adaptive
ABL_LINKED := align0:baseline align1:reals
abl_root    = $(if $(filter 0,$(1)),$(REPRO),$(REPRO)-vae$(1))
define abl_train
$(ABL)/$(1)-s$(2)/vae/manifest.json: $(REPRO)/data/manifest.json
	$(REALS) train-vae $(VAE_RECIPE) $(subst =, ,$(3)) --seed $(2) --out $$(@D)
endef
define abl_link
$(ABL)/$(1)-s$(2)/vae/manifest.json: $(call abl_root,$(2))/$(3)/vae/manifest.json
	mkdir -p $(ABL)/$(1)-s$(2) && ln -sfn $(abspath $(call abl_root,$(2)))/$(3)/vae $(ABL)/$(1)-s$(2)/vae
endef
$(foreach s,$(ABL_SEEDS),$(foreach r,$(ABL_RUNS),$(eval $(call abl_train,$(word 1,$(subst :, ,$(r))),$(s),$(word 2,$(subst :, ,$(r)))))))
$(foreach s,0 1,$(foreach r,$(ABL_LINKED),$(eval $(call abl_link,$(word 1,$(subst :, ,$(r))),$(s),$(word 2,$(subst :, ,$(r)))))))
$(ABL)/%/seg/eval-test/metrics.json: $(ABL)/%/vae/manifest.json $(REPRO)/seg/manifest.json
	$(REALS) probe-seg eval --data $(REPRO)/data --limit $(REPRO_PROBE_LIMIT) --vae $(ABL)/$*/vae --head $(REPRO)/seg \
	  --device $(DEVICE) --out $(@D)
$(ABL)/%/depth/eval-test/metrics.json: $(ABL)/%/vae/manifest.json $(REPRO)/depth/manifest.json
	$(REALS) probe-depth eval --data $(REPRO)/data --format png --limit $(REPRO_PROBE_LIMIT) --vae $(ABL)/$*/vae \
	  --head $(REPRO)/depth --device $(DEVICE) --out $(@D)
ABL_VARIANTS = $(foreach s,$(ABL_SEEDS),$(foreach r,$(ABL_RUNS),$(word 1,$(subst :, ,$(r)))-s$(s))) \
  $(foreach s,0 $(if $(wildcard $(REPRO)-vae1/reals/vae/manifest.json),1),$(foreach r,$(ABL_LINKED),$(word 1,$(subst :, ,$(r)))-s$(s)))

.PHONY: ablations
ablations: $(foreach v,$(ABL_VARIANTS),$(ABL)/$(v)/seg/eval-test/metrics.json $(ABL)/$(v)/depth/eval-test/metrics.json)
	$(REALS) report $(ABL) --out docs/ablations.md --title "ablations: the VAE recipe against alignment, reconstruction and the probes"

# Every artifact is kept: none of them is an intermediate file for make to delete.
.SECONDARY:

bench: install assets
	$(PY) -m reals_cli.bench --out docs/benchmarks.md

# The GPU checks (attention backends, a bf16 DiT-XL/2 step at batch 64, no host sync per training
# step, training MFU, sampling throughput) in one run, on a GPU machine whose Python (3.12) has
# torch but no internet: `make gpu-wheels` here downloads the wheels its image lacks into .whl/;
# there, `make gpu-check GPU_OUT=dir` installs them beside the project, runs the CUDA tests, then
# the benchmarks in GPU_BENCH, each written to dir/benchmarks.{md,json} as soon as it ends (so a
# run cut short keeps what it finished), with the whole log in dir/log.txt. The time it takes (as
# measured on an H100) is 3 minutes for the tests and train-dit, 2 for sample, 2 for profile: one call.
GPU_WHEELS := .whl
GPU_PY     ?= python3
GPU_OUT    ?= gpu-check
GPU_BENCH  ?= train-dit sample profile
GPU_TESTS  ?= -k cuda tests/test_dit.py tests/test_train_dit.py
GPU_SITE   := /tmp/reals-gpu-site
GPU_REQS   := xformers==0.0.35 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 \
              torch-fidelity==0.4.0 lpips==0.1.4 nvidia-cuda-runtime-cu12==12.8.90

gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(GPU_WHEELS) $(GPU_REQS)

gpu-check:
	$(GPU_PY) -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) $(GPU_WHEELS)/*.whl
	rm -f $(GPU_SITE)/nvidia/__init__.py  # else a regular package hiding the image's CUDA 13 nvidia namespace
	mkdir -p $(GPU_OUT) && cp docs/benchmarks.json $(GPU_OUT)/
	export PYTHONPATH=$(GPU_SITE):$(CURDIR) PYTHONUNBUFFERED=1; \
	$(GPU_PY) -c "import torch, xformers; print('torch', torch.__version__, 'xformers', xformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee $(GPU_OUT)/log.txt; \
	nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv 2>&1 | tee -a $(GPU_OUT)/log.txt; \
	if [ -n "$(GPU_TESTS)" ]; then $(GPU_PY) -m pytest -q -rs $(GPU_TESTS) 2>&1 | tee -a $(GPU_OUT)/log.txt; fi; \
	for b in $(GPU_BENCH); do \
	  $(GPU_PY) -m reals_cli.bench --device cuda --only $$b --out $(GPU_OUT)/benchmarks.md 2>&1 | tee -a $(GPU_OUT)/log.txt; \
	done

clean-demo:
	rm -rf $(DEMO)

#!/usr/bin/env bash
# Rewrites every reference to a benchmark script or result file that moved or was renamed when benchmarks/ was split
# into speed/, studies/ and smoke/ and the results took the <device>-<what>-<size>[-<variant>].json names (superseded
# runs under results/history/). Run from anywhere in the checkout, after the moves are merged; then delete this file.
# Idempotent: every pattern matches an old name only, never a new one, so a second run changes nothing.
# Result files get the new names of the result files they cite, but keep the script paths of the commands they record
# (those ran from the old paths).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
scripts=$(mktemp)
results=$(mktemp)
trap 'rm -f "$scripts" "$results"' EXIT
cat > "$scripts" <<'SED'
s#(^|[^A-Za-z0-9_.-])benchmarks/step_time\.py#\1benchmarks/speed/step_time.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/levers\.py#\1benchmarks/speed/levers.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/profile_step\.py#\1benchmarks/speed/profile_step.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/reference_free\.py#\1benchmarks/speed/reference_free.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/inversion_cost\.py#\1benchmarks/speed/inversion_cost.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/generation_time\.py#\1benchmarks/speed/generation_time.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/one_pass_routes\.py#\1benchmarks/speed/one_pass_routes.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/update_search\.py#\1benchmarks/speed/update_search.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/checkpoint_checksums\.py#\1benchmarks/speed/checkpoint_checksums.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/latent_cache_scale\.py#\1benchmarks/speed/latent_cache_scale.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/hpdv3_scale\.py#\1benchmarks/speed/hpdv3_scale.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/flow_family_cost\.py#\1benchmarks/speed/flow_family_cost.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/flow_text_cache\.py#\1benchmarks/speed/flow_text_cache.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/fsdp_reference\.py#\1benchmarks/speed/fsdp_reference.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/safeguard_exactness\.py#\1benchmarks/studies/safeguard_exactness.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/stability_map_figures\.py#\1benchmarks/studies/stability_map_figures.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/stability_map\.py#\1benchmarks/studies/stability_map.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/safeguard_comparison\.py#\1benchmarks/studies/safeguard_comparison.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/smpo_inversion\.py#\1benchmarks/studies/smpo_inversion.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/flow_lambda_stats\.py#\1benchmarks/studies/flow_lambda_stats.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/soak\.py#\1benchmarks/smoke/soak.py#g
s#(^|[^A-Za-z0-9_.-])benchmarks/real_scale_smoke\.py#\1benchmarks/smoke/real_scale_smoke.py#g
SED
cat > "$results" <<'SED'
s#results/cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-one-pass-2026-11-25b\.json#results/history/cpu-one-pass-small-\1pairs-rerun.json#g
s#(^|[^A-Za-z0-9_.-])cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-one-pass-2026-11-25b\.json#\1cpu-one-pass-small-\2pairs-rerun.json#g
s#(^|[^A-Za-z0-9_.-])cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-one-pass-2026-11-25\.json#\1cpu-one-pass-small-\2pairs.json#g
s#results/cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-one-pass-before\.json#results/history/cpu-one-pass-small-\1pairs-earlier.json#g
s#(^|[^A-Za-z0-9_.-])cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-one-pass-before\.json#\1cpu-one-pass-small-\2pairs-earlier.json#g
s#(^|[^A-Za-z0-9_.-])cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-one-pass-memory-2026-11-25\.json#\1cpu-one-pass-memory-small-\2pairs.json#g
s#results/cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-one-pass-memory\.json#results/history/cpu-one-pass-memory-small-\1pairs-previous.json#g
s#(^|[^A-Za-z0-9_.-])cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-one-pass-memory\.json#\1cpu-one-pass-memory-small-\2pairs-previous.json#g
s#results/cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-one-pass\.json#results/history/cpu-one-pass-small-\1pairs-previous.json#g
s#(^|[^A-Za-z0-9_.-])cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-one-pass\.json#\1cpu-one-pass-small-\2pairs-previous.json#g
s#(^|[^A-Za-z0-9_.-])cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-update-space-2026-11-25\.json#\1cpu-update-space-small-\2pairs.json#g
s#results/cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-safeguards\.json#results/history/cpu-safeguard-overhead-small-\1pairs.json#g
s#(^|[^A-Za-z0-9_.-])cpu-small-([0-9]+|\{[0-9,]+\}|\*)pairs-safeguards\.json#\1cpu-safeguard-overhead-small-\2pairs.json#g
s#(^|[^A-Za-z0-9_.-])one-pass-layers-cpu-([0-9]+|\{[0-9,]+\}|\*)pairs\.json#\1cpu-one-pass-layers-small-\2pairs.json#g
s#(^|[^A-Za-z0-9_.-])cpu-small-update-space-always-search\.json#\1cpu-update-space-small-2pairs-uncached-always-search.json#g
s#(^|[^A-Za-z0-9_.-])cpu-small-update-space\.json#\1cpu-update-space-small-2pairs-uncached.json#g
s#(^|[^A-Za-z0-9_.-])cpu-small\.json#\1cpu-step-time-small.json#g
s#(^|[^A-Za-z0-9_.-])cpu-soak\.json#\1cpu-soak-tiny.json#g
s#(^|[^A-Za-z0-9_.-])checkpoint-checksums-cpu\.json#\1cpu-checkpoint-checksums-tiny-100mb.json#g
s#(^|[^A-Za-z0-9_.-])ci-suite-cpu-quiet-xdist\.json#\1cpu-test-suite-xdist.json#g
s#results/ci-suite-cpu-quiet\.json#results/history/cpu-test-suite-one-process.json#g
s#(^|[^A-Za-z0-9_.-])ci-suite-cpu-quiet\.json#\1cpu-test-suite-one-process.json#g
s#(^|[^A-Za-z0-9_.-])test-suite-durations-cpu\.json#\1cpu-test-suite-durations.json#g
s#(^|[^A-Za-z0-9_.-])cuda-h100-generation\.json#\1cuda-h100-generation-time-sd15-sdxl.json#g
s#(^|[^A-Za-z0-9_.-])cuda-h100-real-scale-smoke\.json#\1cuda-h100-real-scale-smoke-sd15.json#g
s#results/cuda-h100-sd15-4pairs-first-run\.json#results/history/cuda-h100-step-time-sd15-4pairs-first-run.json#g
s#(^|[^A-Za-z0-9_.-])cuda-h100-sd15-4pairs-first-run\.json#\1cuda-h100-step-time-sd15-4pairs-first-run.json#g
s#(^|[^A-Za-z0-9_.-])cuda-h100-sd15-4pairs\.json#\1cuda-h100-step-time-sd15-4pairs.json#g
s#(^|[^A-Za-z0-9_.-])cuda-h100-sd15-8pairs\.json#\1cuda-h100-step-time-sd15-8pairs.json#g
s#(^|[^A-Za-z0-9_.-])cuda-h100-sdxl-2pairs-checkpointing\.json#\1cuda-h100-step-time-sdxl-2pairs-checkpointing.json#g
s#(^|[^A-Za-z0-9_.-])flow-distributed-cpu\.json#\1cpu-flow-distributed-tiny.json#g
s#(^|[^A-Za-z0-9_.-])flow-distributed-qwen-image21-cpu\.json#\1cpu-flow-distributed-tiny-qwen-image21.json#g
s#(^|[^A-Za-z0-9_.-])flow-distributed-safeguard-resume-cpu\.json#\1cpu-flow-distributed-tiny-safeguard-resume.json#g
s#(^|[^A-Za-z0-9_.-])flow-family-cost-cpu-tiny\.json#\1cpu-flow-family-cost-tiny.json#g
s#(^|[^A-Za-z0-9_.-])flow-family-cost-flux2-cpu-tiny\.json#\1cpu-flow-family-cost-tiny-flux2.json#g
s#(^|[^A-Za-z0-9_.-])flow-family-cost-kontext-cpu-tiny\.json#\1cpu-flow-family-cost-tiny-kontext.json#g
s#(^|[^A-Za-z0-9_.-])flow-lambda-stats-cpu-tiny\.json#\1cpu-flow-lambda-stats-tiny.json#g
s#(^|[^A-Za-z0-9_.-])flow-text-cache-cpu-tiny\.json#\1cpu-flow-text-cache-tiny.json#g
s#(^|[^A-Za-z0-9_.-])fsdp-reference-cpu-small\.json#\1cpu-fsdp-reference-small.json#g
s#(^|[^A-Za-z0-9_.-])help-time-cpu\.json#\1cpu-help-time-cli.json#g
s#(^|[^A-Za-z0-9_.-])hpdv3-scale-cpu\.json#\1cpu-hpdv3-scale-1170k.json#g
s#(^|[^A-Za-z0-9_.-])hpdv3-scale-jsonl-cpu\.json#\1cpu-hpdv3-scale-1170k-jsonl.json#g
s#(^|[^A-Za-z0-9_.-])hpdv3-validate-once-cpu\.json#\1cpu-hpdv3-validate-once-600rows.json#g
s#(^|[^A-Za-z0-9_.-])image-check-stat-once-cpu\.json#\1cpu-image-check-stat-once-2000rows.json#g
s#(^|[^A-Za-z0-9_.-])inversion-cost-cpu-small\.json#\1cpu-inversion-cost-small.json#g
s#(^|[^A-Za-z0-9_.-])latent-cache-cpu-small\.json#\1cpu-latent-cache-small.json#g
s#(^|[^A-Za-z0-9_.-])levers-cpu-small\.json#\1cpu-levers-small.json#g
s#(^|[^A-Za-z0-9_.-])one-pass-ablation-cpu-repeat\.json#\1cpu-one-pass-ablation-small-2pairs-repeat.json#g
s#(^|[^A-Za-z0-9_.-])one-pass-ablation-cpu\.json#\1cpu-one-pass-ablation-small-2pairs.json#g
s#(^|[^A-Za-z0-9_.-])one-pass-profile-cpu\.json#\1cpu-one-pass-profile-small-2pairs.json#g
s#(^|[^A-Za-z0-9_.-])one-pass-routes-cpu\.json#\1cpu-one-pass-routes-small-2pairs.json#g
s#(^|[^A-Za-z0-9_.-])one-pass-routes-sd15-cpu\.json#\1cpu-one-pass-routes-sd15-2pairs.json#g
s#(^|[^A-Za-z0-9_.-])reference-free-cpu-small\.json#\1cpu-reference-free-small.json#g
s#(^|[^A-Za-z0-9_.-])reference-free-cuda-h100-sd15\.json#\1cuda-h100-reference-free-sd15.json#g
s#(^|[^A-Za-z0-9_.-])safeguard-comparison-cpu-lr1e-4-2e-4\.json#\1cpu-safeguard-comparison-demo-lr1e-4-2e-4.json#g
s#(^|[^A-Za-z0-9_.-])safeguard-comparison-cpu-lr2e-4-parameter-update\.json#\1cpu-safeguard-comparison-demo-lr2e-4-parameter-update.json#g
s#(^|[^A-Za-z0-9_.-])safeguard-comparison-cpu-lr2e-5-1000steps\.json#\1cpu-safeguard-comparison-demo-lr2e-5-1000steps.json#g
s#(^|[^A-Za-z0-9_.-])safeguard-comparison-cpu-lr2e-5-200steps\.json#\1cpu-safeguard-comparison-demo-lr2e-5-200steps.json#g
s#(^|[^A-Za-z0-9_.-])safeguard-comparison-cpu-pair-lr\{2e-4,2e-5\}\.json#\1cpu-safeguard-comparison-demo-pair-lr{2e-4,2e-5}.json#g
s#(^|[^A-Za-z0-9_.-])safeguard-comparison-cpu-pair-lr2e-4\.json#\1cpu-safeguard-comparison-demo-pair-lr2e-4.json#g
s#(^|[^A-Za-z0-9_.-])safeguard-comparison-cpu-pair-lr2e-5\.json#\1cpu-safeguard-comparison-demo-pair-lr2e-5.json#g
s#(^|[^A-Za-z0-9_.-])safeguard-comparison-cpu-\*\.json#\1cpu-safeguard-comparison-demo-*.json#g
s#(^|[^A-Za-z0-9_.-])safeguard-comparison-cpu\.json#\1cpu-safeguard-comparison-demo.json#g
s#(^|[^A-Za-z0-9_.-])smpo-inversion-demo-cpu\.json#\1cpu-smpo-inversion-demo.json#g
s#results/stability-map-cpu-small\.json#results/history/cpu-stability-map-demo-4pairs-one-seed.json#g
s#(^|[^A-Za-z0-9_.-])stability-map-cpu-small\.json#\1cpu-stability-map-demo-4pairs-one-seed.json#g
s#(^|[^A-Za-z0-9_.-])stability-map-cpu\.json#\1cpu-stability-map-demo.json#g
s#(^|[^A-Za-z0-9_.-])step-time-aa-cpu-small\.json#\1cpu-step-time-small-2pairs-aa.json#g
s#(^|[^A-Za-z0-9_.-])structure-\{before,after\}-cpu-small-2pairs-run\{1,2\}\.json#\1cpu-structure-small-2pairs-{before,after}-run{1,2}.json#g
s#(^|[^A-Za-z0-9_.-])structure-abba-cpu-small-2pairs\.json#\1cpu-structure-small-2pairs-abba.json#g
s#(^|[^A-Za-z0-9_.-])structure-abba-cpu-small-4pairs\.json#\1cpu-structure-small-2pairs-abba-twice.json#g
s#(^|[^A-Za-z0-9_.-])structure-after-cpu-small-2pairs-run1\.json#\1cpu-structure-small-2pairs-after-run1.json#g
s#(^|[^A-Za-z0-9_.-])structure-after-cpu-small-2pairs-run2\.json#\1cpu-structure-small-2pairs-after-run2.json#g
s#(^|[^A-Za-z0-9_.-])structure-after-cpu-small-2pairs\.json#\1cpu-structure-small-2pairs-after.json#g
s#(^|[^A-Za-z0-9_.-])structure-before-cpu-small-2pairs-run1\.json#\1cpu-structure-small-2pairs-before-run1.json#g
s#(^|[^A-Za-z0-9_.-])structure-before-cpu-small-2pairs-run2\.json#\1cpu-structure-small-2pairs-before-run2.json#g
s#(^|[^A-Za-z0-9_.-])structure-before-cpu-small-2pairs\.json#\1cpu-structure-small-2pairs-before.json#g
s#(^|[^A-Za-z0-9_.-])structure-session-abba-cpu-small\.json#\1cpu-structure-small-2pairs-session-abba.json#g
s#(^|[^A-Za-z0-9_.-])update-search-cpu\.json#\1cpu-update-search-12m.json#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_pair_adamw_unet_mu#\1cpu-safeguard-exactness-tiny-pair-adamw-unet-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_pair_unet_mu#\1cpu-safeguard-exactness-tiny-pair-unet-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_adamw_unet_mu#\1cpu-safeguard-exactness-tiny-adamw-unet-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_adamw_sd3_mu#\1cpu-safeguard-exactness-tiny-adamw-sd3-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_adamw_\{unet,sd3\}_mu#\1cpu-safeguard-exactness-tiny-adamw-{unet,sd3}-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_flux2_klein_mu#\1cpu-safeguard-exactness-tiny-flux2-klein-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_flux2_mu#\1cpu-safeguard-exactness-tiny-flux2-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_flux_mu#\1cpu-safeguard-exactness-tiny-flux-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_qwen_image_mu#\1cpu-safeguard-exactness-tiny-qwen-image-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_z_image_mu#\1cpu-safeguard-exactness-tiny-z-image-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_sd3_mu#\1cpu-safeguard-exactness-tiny-sd3-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_wan_mu#\1cpu-safeguard-exactness-tiny-wan-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_\{sd3,flux\}_mu#\1cpu-safeguard-exactness-tiny-{sd3,flux}-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_mu#\1cpu-safeguard-exactness-tiny-unet-mu#g
s#(^|[^A-Za-z0-9_.-])safeguard_exactness_adamw_\*#\1cpu-safeguard-exactness-tiny-adamw-*#g
SED
# files that may cite a script or a result file: text under these paths
texts() {
    git ls-files -z -- README.md CONTRIBUTING.md CHANGELOG.md docs trl_diffusion_sdpo tests benchmarks examples mkdocs.yml \
        | grep -zE '\.(md|py|json|ya?ml|toml|txt|cfg|sh)$' \
        | xargs -0 grep -lIZE 'benchmarks/|\.json' --
}
texts | grep -zv '^benchmarks/results/' | xargs -0 -r sed -i -E -f "$scripts"
texts | xargs -0 -r sed -i -E -f "$results"

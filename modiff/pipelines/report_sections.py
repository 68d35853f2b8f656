"""The sections of a report's index, in the order of the paper: what each shows and which files hold it.

A section names its notebook, the figures (glob patterns under figures/) shown inline, the tables
(names under tables/) rendered in full, folded, or only linked when they are long, and the findings its
notebook writes (tables/<name>_finding.md, by `analysis.tables.save_finding`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Section", "SECTIONS", "FINDING_SUFFIX", "figure_files"]

FINDING_SUFFIX = "_finding.md"


@dataclass(frozen=True)
class Section:
    anchor: str
    title: str
    notebook: str
    about: str  # one sentence: what the paper shows, what is measured here
    figures: tuple[str, ...] = ()
    tables: tuple[str, ...] = ()  # rendered in full
    folded: tuple[str, ...] = ()  # rendered inside a fold (long, or secondary)
    linked: tuple[str, ...] = ()  # too long to render: linked
    findings: tuple[str, ...] = ()


SECTIONS: tuple[Section, ...] = (
    Section("fig1a", "Figure 1a: caching error over steps", "fig1a_caching",
            "Relative L2 distance of the middle-block features between a model that reuses each layer's output for "
            "N - 1 steps and the standard model, from the same noise (the paper: about 40% at the last step already "
            "for N = 3, growing with N and with the step). The paper does not give the refresh phase: here a layer "
            "computes at sampling steps 0, N, 2N, ... (step 0 the noisiest) and reuses its output in between, so "
            "with 100 steps the last one, 99, is a refresh for N = 3 (the table labels each N's last step).",
            figures=("fig1a_caching_error.png",), tables=("fig1a_caching_summary",), findings=("fig1a_caching",)),
    Section("fig1b", "Figure 1b: activations against their temporal differences", "fig1b_activations",
            "Per-step distributions of a layer's inputs a_t and of a_t - a_{t+1} (the paper: the differences are "
            "concentrated, more than 10x narrower).",
            figures=("fig1b_*.png",), tables=("fig1b_range_ratios",), findings=("fig1b_activations",)),
    Section("theory", "Theorems 4.3 and 4.4 on every layer", "theory_bounds",
            "The quantizer error bound (Theorem 4.3) and the error-propagation bounds (30) and (31) of Theorem 4.4, "
            "as printed and as unrolled from the paper's proof, with c estimated on calibration trajectories and "
            "the bounds checked on held-out ones.",
            figures=("theory_tightness_out_of_sample.png", "theory_c_per_layer.png", "theory_tightness_in_sample.png"),
            folded=("theory_bound_summary",), linked=("theory_decay_failures", "theory_c_per_layer"),
            findings=("theory_bounds",)),
    Section("fig3", "Figure 3 and Table 4: error compensation", "fig3_compensation",
            "Relative L2 distance of the middle-block features between the quantized and the full-precision model, "
            "per activation bit width, with and without error compensation (the paper: with it the error stays small "
            "even at 3 bits). The table is Table 4's ablation in this measure, at A8, A6, A4 and A3: the paper's "
            "Table 4 compares at A6 and A4 and has a full-precision-activation column (its metric is not in the paper's "
            "brief), which in this measure is 0 by definition.",
            figures=("fig3_compensation.png",), tables=("table4_last_step_error",), findings=("fig3_compensation",)),
    Section("table1", "Table 1: bit widths, direct quantization against MoDiff", "table1_bitwidth",
            "FID, fidelity to full precision and GBops for every quantization preset from the same seeds, with "
            "paired-bootstrap verdicts and the paper's numbers beside ours.",
            tables=("table1_bitwidth",), folded=("table1_fp_gpu_vs_cpu", "table1_paper_values", "table1_step_sizes"),
            findings=("table1_bitwidth", "table1_step_sizes")),
    Section("samplers", "Tables 5 and 15-18: samplers, step counts and warm-up steps", "samplers",
            "FID of full-precision and quantized samples per sampler (DDIM at 20 steps, half and all the steps, DDPM, "
            "DPM-Solver), their relative L2 to the full-precision samples of the same seeds, and MoDiff with k "
            "full-precision warm-up steps.",
            tables=("samplers_fid", "samplers", "samplers_paired", "warmup_steps", "warmup_steps_paired"),
            findings=("samplers_fid", "samplers", "warmup_steps")),
    Section("bops", "Tables 6 and 19-21: BOPs and memory", "bops_memory",
            "GBops per image and the MoDiff state (a_hat, o_hat of every modulated layer) against batch size, and "
            "the state per image under several accountings, here and for a CIFAR-10-size UNet.",
            tables=("bops_memory", "modiff_state_accounting"), findings=("bops_memory",)),
    Section("grids", "Figures 4-10: samples from the same seeds", "sample_grids",
            "Full precision, direct quantization and MoDiff from the same seeds, and where the round-to-nearest W4 "
            "error comes from (one layer group quantized at a time).",
            figures=("grid_fp.png", "grid_w8a4.png", "grid_w8a4-modiff.png", "grid_w4a4.png", "grid_w4a4-modiff.png",
                     "grid_*.png"),
            tables=("w4_layer_sensitivity",), findings=("sample_grids",)),
    Section("audit", "The published code, audited", "published_audit",
            "Two behaviours of the published MoDiff code measured on our model: the per-step state reset of its "
            "CIFAR-10 sampler, and activation scales shared by a whole batch.",
            tables=("published_audit", "published_scale_sharing", "published_design_effect"),
            findings=("published_audit", "published_scale_sharing", "published_design_effect")),
    Section("model", "Appendix: the model", "model_card",
            "The embedded full-precision model: its training loss and samples (not a paper artefact).",
            figures=("samples_fp.png", "training_loss.png")),
)


def figure_files(out_dir: Path, section: Section) -> list[str]:
    """The PNGs of ``section`` that exist, relative to ``out_dir``, in the order of its patterns, each once."""
    found: list[str] = []
    for pattern in section.figures:
        for path in sorted((out_dir / "figures").glob(pattern)):
            name = str(path.relative_to(out_dir))
            if name not in found:
                found.append(name)
    return found

"""Q-Diffusion post-training calibration of static presets.

`data` (calibration data from one sampling pass), `adaround` (learned weight rounding), `reconstruct`
(BRECQ block reconstruction), `lsq` (learned activation step sizes), `optimize` (the shared optimisation
loop), `calibrate` (the recipe), `saved` (save and load calibrated models) and `reuse` (calibrate into a
folder once, reload afterwards).
"""

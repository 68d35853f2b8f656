"""Utilities every layer may use: run directories (`runs`), images (`images`), devices (`device`), per-seed
random streams (`rng`), repository paths (`paths`), hooks (`hooks`) and module selection (`selection`).
Nothing here imports another part of modiff."""

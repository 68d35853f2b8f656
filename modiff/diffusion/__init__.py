"""Noise schedules, timestep sequences and samplers."""

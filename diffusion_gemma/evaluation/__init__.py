"""Evaluation: Sudoku solving and scoring, loading models to evaluate, result files and plot data."""

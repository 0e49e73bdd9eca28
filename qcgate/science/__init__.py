"""Difficulty science: DSC Lesion targets and the per-group analysis of the paper's Table 2."""

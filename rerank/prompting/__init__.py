"""Prompting: the label schemes and the one prompt format shared by training and inference."""

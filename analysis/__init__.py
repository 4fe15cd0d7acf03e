"""Analyses of finished run directories: paper tables, label-scheme and training-variant
comparisons, generation baseline, position bias, plots. Reads run directories (the last stage of
the data flow); never writes into the runs it reads."""

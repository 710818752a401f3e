"""The report of a finished run: plots, the numbers behind them, labels, report.md.

plots    volcano, p-value histogram and QQ, convergence
values   the terms, file stems and values the plots draw
labels   name labels for the top points of a plot
summary  the top genes in the log and OUTPUT/report.md
"""

# InstEval (lme4, Fahrmeir et al.) rows 1-10000: export the columns the Python benchmark
# reads (benchmarks/data/insteval_10000.csv.gz) and time lmer on them.
#   Rscript benchmarks/insteval_lmer.R [export|time] [repeats]
# Model: y ~ 1 + (1 | s) + (1 | d), REML (lmer's default), as bench_structured.py fits it.
suppressMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
what <- if (length(args) >= 1) args[1] else "time"
repeats <- if (length(args) >= 2) as.integer(args[2]) else 3L
ie <- droplevels(InstEval[1:10000, ])
if (what == "export") {
  out <- data.frame(s = as.integer(ie$s), d = as.integer(ie$d), y = as.integer(ie$y))
  dir <- file.path("benchmarks", "data")
  con <- gzfile(file.path(dir, "insteval_10000.csv.gz"), "w")
  write.csv(out, con, row.names = FALSE)
  close(con)
  cat(sprintf("wrote %d rows: %d levels of s, %d of d (lme4 %s)\n", nrow(out),
              nlevels(ie$s), nlevels(ie$d), as.character(packageVersion("lme4"))))
} else {
  times <- numeric(repeats)
  cpu <- numeric(repeats)
  for (i in seq_len(repeats)) {
    t0 <- proc.time()
    fit <- lmer(y ~ 1 + (1 | s) + (1 | d), data = ie, REML = TRUE)
    t1 <- proc.time()
    times[i] <- t1[["elapsed"]] - t0[["elapsed"]]
    cpu[i] <- (t1[["user.self"]] + t1[["sys.self"]]) - (t0[["user.self"]] + t0[["sys.self"]])
  }
  vc <- as.data.frame(VarCorr(fit))
  cat(sprintf("lmer seconds per fit: %s\n", paste(sprintf("%.3f", times), collapse = " ")))
  cat(sprintf("lmer cpu seconds per fit: %s\n", paste(sprintf("%.3f", cpu), collapse = " ")))
  cat(sprintf("theta: %s\n", paste(sprintf("%s=%.10g", vc$grp, vc$vcov), collapse = " ")))
  cat(sprintf("fixef: %.10g\nlogLik: %.10g\n", fixef(fit)[[1]], as.numeric(logLik(fit))))
}

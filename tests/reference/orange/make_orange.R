# Reference for flashmm_dask's safeguarded search (numerics/ascent.py) and the scaled inverse
# of the observed information (Satterthwaite's df): R's datasets::Orange,
#   circumference ~ age + (1 | Tree) + (0 + age | Tree)
# REML and ML, fitted by lme4 with tight tolerances, df by lmerTest (Satterthwaite). The
# information of the slope's variance is ~1e10 times the intercept's (age runs to 1582):
# Fisher scoring from R's start stalls there (flashmm_dask before ascent.py: not_converged,
# REML log-likelihood 1.24 below this optimum; lme4's default fit stops early too).
#
# Run from this folder:  Rscript make_orange.R   (writes orange.json)

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(jsonlite)
})

ctrl <- lmerControl(
  optimizer = "nloptwrap",
  check.conv.singular = .makeCC(action = "ignore", tol = 1e-4),
  optCtrl = list(xtol_abs = 1e-12, ftol_abs = 1e-14, xtol_rel = 1e-12, ftol_rel = 1e-14,
                 maxeval = 1e5),
  calc.derivs = FALSE
)

versions <- function() {
  pk <- c("lme4", "lmerTest", "Matrix", "numDeriv", "nloptr", "jsonlite")
  c(list(R = R.version.string, platform = R.version$platform),
    setNames(lapply(pk, function(p) as.character(packageVersion(p))), pk))
}

d <- as.data.frame(datasets::Orange)
d$Tree <- factor(as.character(d$Tree))  # levels 1..5 in sorted order, as numpy's unique
fits <- list()
for (reml in c(TRUE, FALSE)) {
  fit <- lmer(circumference ~ age + (1 | Tree) + (0 + age | Tree), data = d, REML = reml,
              control = ctrl)
  vc <- as.data.frame(VarCorr(fit))
  co <- summary(fit, ddf = "Satterthwaite")$coefficients
  fits[[if (reml) "REML" else "ML"]] <- list(
    theta = c(vc$vcov[vc$grp != "Residual"], sigma(fit)^2),
    logLik = as.numeric(logLik(fit)), singular = isSingular(fit),
    coefficients = list(estimate = unname(co[, "Estimate"]), se = unname(co[, "Std. Error"]),
                        df = unname(co[, "df"]), p = unname(co[, "Pr(>|t|)"]))
  )
}
out <- list(
  source = "R datasets::Orange; model circumference ~ age + (1 | Tree) + (0 + age | Tree)",
  versions = versions(),
  cells = list(tree = as.integer(d$Tree), age = d$age, circumference = d$circumference),
  fits = fits
)
write(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE), "orange.json")

# Reference cases for flashmm_dask's non-negative variance components (lmm(...,
# nonnegative = TRUE)): lme4 + lmerTest fits whose optimum is on the boundary (a variance
# component estimated as zero, lme4's "singular" fit), next to interior ones.
#
# Run from this folder:  Rscript make_cases.R
# Writes dyestuff2.json (lme4's Dyestuff2: Yield ~ 1 + (1 | Batch), singular under REML and
# ML), k1.json ((1 | sam), subjects nested in treatment, some features without subject
# variance) and k2.json ((1 | sam) + (0 + time | sam), features with either, both or neither
# component at zero). REML and ML fits of each. Numbers at full double precision
# (jsonlite digits = NA); simulated data are rounded before fitting, so the JSON holds
# exactly the data that were fitted.

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(jsonlite)
})

# Tight optimiser tolerances: the comparison is at the constrained REML/ML optimum.
ctrl <- lmerControl(
  optimizer = "nloptwrap",
  check.conv.singular = .makeCC(action = "ignore", tol = 1e-4),  # recorded: isSingular()
  optCtrl = list(xtol_abs = 1e-12, ftol_abs = 1e-14, xtol_rel = 1e-12, ftol_rel = 1e-14,
                 maxeval = 1e5),
  calc.derivs = FALSE
)

versions <- function() {
  pk <- c("lme4", "lmerTest", "Matrix", "numDeriv", "nloptr", "jsonlite")
  c(list(R = R.version.string, platform = R.version$platform),
    setNames(lapply(pk, function(p) as.character(packageVersion(p))), pk))
}

# Variances in flashmm_dask's order: the random components, then the residual.
variances <- function(fit) {
  vc <- as.data.frame(VarCorr(fit))
  c(vc$vcov[vc$grp != "Residual"], sigma(fit)^2)
}

fit_feature <- function(y, cells, fixed, random, reml, L) {
  d <- cbind(cells, y = y)
  form <- as.formula(paste("y ~", fixed, "+", paste(random, collapse = " + ")))
  fit <- lmer(form, data = d, REML = reml, control = ctrl)
  co <- summary(fit, ddf = "Satterthwaite")$coefficients
  out <- list(
    theta = variances(fit), logLik = as.numeric(logLik(fit)), singular = isSingular(fit),
    lme4_theta = unname(getME(fit, "theta")),
    coefficients = list(
      estimate = unname(co[, "Estimate"]), se = unname(co[, "Std. Error"]),
      df = unname(co[, "df"]), t = unname(co[, "t value"]), p = unname(co[, "Pr(>|t|)"])
    ),
    vcov = unname(as.matrix(vcov(fit)))
  )
  if (!is.null(L)) {
    ct <- contest(fit, L, joint = FALSE, ddf = "Satterthwaite")
    out$contrast <- list(estimate = ct$Estimate, se = ct$`Std. Error`, df = ct$df,
                         t = ct$`t value`, p = ct$`Pr(>|t|)`)
  }
  out
}

stack_fits <- function(fits) {
  get <- function(f, path) Reduce(function(x, k) x[[k]], path, f)
  arr <- function(path) do.call(cbind, lapply(fits, get, path = path))
  out <- list(
    theta = arr("theta"), logLik = sapply(fits, `[[`, "logLik"),
    singular = sapply(fits, `[[`, "singular"), lme4_theta = arr("lme4_theta"),
    coefficients = lapply(setNames(nm = names(fits[[1]]$coefficients)),
                          function(k) arr(c("coefficients", k))),
    vcov = lapply(fits, `[[`, "vcov")
  )
  if (!is.null(fits[[1]][["contrast"]])) {
    out$contrast <- lapply(setNames(nm = names(fits[[1]]$contrast)),
                           function(k) sapply(fits, function(f) f$contrast[[k]]))
  }
  out
}

write_case <- function(file, seed, cells, X, Y, fixed, random, L, Zspec, note) {
  fits <- lapply(setNames(nm = c("REML", "ML")), function(method) {
    stack_fits(lapply(seq_len(nrow(Y)), function(j)
      fit_feature(Y[j, ], cells, fixed, random, method == "REML", L)))
  })
  case <- list(
    provenance = list(
      script = "make_cases.R", seed = seed, versions = versions(), note = note,
      lmerControl = "nloptwrap, xtol_abs 1e-12, ftol_abs 1e-14, xtol_rel 1e-12, ftol_rel 1e-14",
      ddf = "Satterthwaite (lmerTest summary() and contest(joint = FALSE))"
    ),
    fixed = paste("~", fixed), random = random, Z = Zspec,
    cells = list(
      n = nrow(cells), covariates = colnames(X), X = unname(X),
      sam = as.integer(cells$sam), sam_levels = levels(cells$sam),
      time = if (is.null(cells$time)) NULL else cells$time,
      features = rownames(Y), Y = unname(Y)
    ),
    components = c(if (length(random) > 1) c("sam", "time") else "sam", "residual"),
    contrast = if (is.null(L)) NULL else unname(L),
    fits = fits
  )
  writeLines(toJSON(case, digits = NA, auto_unbox = TRUE, matrix = "rowmajor"), file)
}

# lme4's Dyestuff2 (Box and Tiao): 30 yields, 6 batches; lmer's fit is singular.
dyestuff2 <- function() {
  cells <- data.frame(sam = factor(Dyestuff2$Batch))
  X <- model.matrix(~ 1, cells)
  Y <- matrix(Dyestuff2$Yield, nrow = 1, dimnames = list("Yield", NULL))
  write_case("dyestuff2.json", NA, cells, X, Y, "1", "(1 | sam)", NULL, "sam",
             "lme4::Dyestuff2, Yield ~ 1 + (1 | Batch) (Batch renamed sam)")
}

make_cells <- function(n, nsam) {
  sam <- sort(sample(rep_len(seq_len(nsam), n)))
  data.frame(
    sam = factor(sprintf("S%02d", sam)),
    trt = factor(ifelse(sam <= nsam / 2, "A", "B")),
    cls = factor(sample(c("1", "2"), n, replace = TRUE)),
    x = round(rnorm(n), 3),
    time = round(runif(n), 3)
  )
}

# Subject variances s1 (intercept) and s2 (slope of time): zero for some features.
simulated <- function(file, n, nsam, m, slope, seed) {
  set.seed(seed)
  cells <- make_cells(n, nsam)
  fixed <- "0 + cls + cls:trt + x"
  X <- model.matrix(as.formula(paste("~", fixed)), cells)
  s <- as.integer(cells$sam)
  Y <- matrix(0, m, n, dimnames = list(sprintf("gene%d", seq_len(m)), NULL))
  for (j in seq_len(m)) {
    s1 <- c(0, 0.3, 0, 0.02, 0, 1, 0, 0.5)[(j - 1) %% 8 + 1]
    s2 <- if (slope) c(0, 0, 0.8, 0, 0.05, 0, 0, 1)[(j - 1) %% 8 + 1] else 0
    s0 <- c(1, 0.5, 2, 1.5, 0.8, 1.2, 0.7, 1.8)[(j - 1) %% 8 + 1]
    b <- rnorm(nsam, sd = sqrt(s1))[s] + rnorm(nsam, sd = sqrt(s2))[s] * cells$time
    mu <- 2 + 0.5 * (cells$cls == "2") + 0.2 * cells$x + 0.3 * (cells$trt == "B")
    Y[j, ] <- round(mu + b + rnorm(n, sd = sqrt(s0)), 4)
  }
  L <- setNames(numeric(ncol(X)), colnames(X))
  L[c("cls1:trtB", "cls2:trtB")] <- 0.5  # the treatment effect, constant within subjects
  random <- if (slope) c("(1 | sam)", "(0 + time | sam)") else "(1 | sam)"
  Zspec <- if (slope) c("sam", "sam:time") else "sam"
  write_case(file, seed, cells, X, Y, fixed, random, L, Zspec,
             "simulated: subjects nested in treatment; subject variances zero for some features")
}

dyestuff2()
simulated("k1.json", n = 400, nsam = 8, m = 16, slope = FALSE, seed = 20261206)
simulated("k2.json", n = 600, nsam = 8, m = 16, slope = TRUE, seed = 20261207)

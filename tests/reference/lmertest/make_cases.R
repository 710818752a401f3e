# Reference cases for flashmm_dask's Satterthwaite degrees of freedom and the
# likelihood-ratio tests of variance components: lme4 + lmerTest on small simulated
# cell-level data sets (subjects nested in treatment).
#
# Run from this folder:  Rscript make_cases.R
# Writes k1.json (one random component, (1 | sam)) and k2.json ((1 | sam) +
# (0 + time | sam), two independent components), each with REML and ML fits.
# Every number is written at full double precision (jsonlite digits = NA). The data are
# rounded before fitting, so the JSON holds exactly the data that were fitted.

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(jsonlite)
})

# Tight optimiser tolerances: the comparison is at the REML/ML optimum.
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

# Cell-level design: n cells, subjects nested in treatment (first half "A", second "B"),
# a cell-level cell type (2 levels) and cell-level covariates x and time.
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

# Per-feature variance components and effects, varied so that the df vary.
simulate_y <- function(cells, m, slope) {
  nsam <- nlevels(cells$sam)
  Y <- matrix(0, m, nrow(cells))
  s <- as.integer(cells$sam)
  for (j in seq_len(m)) {
    s1 <- c(0.05, 0.2, 0.5, 1, 0.1, 2, 0.3, 0.8)[(j - 1) %% 8 + 1]
    s2 <- if (slope) c(0.5, 0.1, 1, 0.3, 2, 0.2, 0.6, 1.5)[(j - 1) %% 8 + 1] else 0
    s0 <- c(1, 0.5, 2, 1.5, 0.8, 1.2, 0.7, 1.8)[(j - 1) %% 8 + 1]
    b <- rnorm(nsam, sd = sqrt(s1))[s]
    a <- rnorm(nsam, sd = sqrt(s2))[s] * cells$time
    beta <- c(1, 0, 0.3, 0, 0.5, 0.2, 0, 0.4)[(j - 1) %% 8 + 1]
    mu <- 2 + 0.5 * (cells$cls == "2") + 0.2 * cells$x +
      beta * (cells$trt == "B") * (cells$cls == "2")
    Y[j, ] <- round(mu + b + a + rnorm(nrow(cells), sd = sqrt(s0)), 4)
  }
  rownames(Y) <- sprintf("gene%d", seq_len(m))
  Y
}

coef_table <- function(fit) {
  co <- summary(fit, ddf = "Satterthwaite")$coefficients
  list(
    estimate = unname(co[, "Estimate"]), se = unname(co[, "Std. Error"]),
    df = unname(co[, "df"]), t = unname(co[, "t value"]), p = unname(co[, "Pr(>|t|)"])
  )
}

contrast_table <- function(fit, L) {
  rows <- lapply(seq_len(ncol(L)), function(k) {
    ct <- contest(fit, L[, k], joint = FALSE, ddf = "Satterthwaite")
    c(ct$Estimate, ct$`Std. Error`, ct$df, ct$`t value`, ct$`Pr(>|t|)`)
  })
  tab <- do.call(rbind, rows)
  list(estimate = tab[, 1], se = tab[, 2], df = tab[, 3], t = tab[, 4], p = tab[, 5])
}

# Variances in flashmm_dask's order: the random components, then the residual.
variances <- function(fit) {
  vc <- as.data.frame(VarCorr(fit))
  c(vc$vcov[vc$grp != "Residual"], sigma(fit)^2)
}

fit_feature <- function(y, cells, fixed, random, reml, L, fixed_reduced) {
  d <- cbind(cells, y = y)
  form <- as.formula(paste("y ~", fixed, "+", paste(random, collapse = " + ")))
  fit <- lmer(form, data = d, REML = reml, control = ctrl)
  out <- list(
    theta = variances(fit), logLik = as.numeric(logLik(fit)), singular = isSingular(fit),
    coefficients = coef_table(fit), contrasts = contrast_table(fit, L)
  )
  if (!reml) {
    # Likelihood-ratio test of the fixed effects: drop the treatment terms (ML fits).
    red <- lmer(as.formula(paste("y ~", fixed_reduced, "+", paste(random, collapse = " + "))),
                data = d, REML = FALSE, control = ctrl)
    a <- anova(fit, red)
    out$lrt_fixed <- list(chisq = a$Chisq[2], df = a$Df[2], p = a$`Pr(>Chisq)`[2],
                          logLik_reduced = as.numeric(logLik(red)),
                          singular_reduced = isSingular(red))
  }
  if (reml) {
    # Likelihood-ratio test of each random component against the model without it.
    out$lrt <- lapply(seq_along(random), function(k) {
      rest <- random[-k]
      if (length(rest)) {
        red <- lmer(as.formula(paste("y ~", fixed, "+", paste(rest, collapse = " + "))),
                    data = d, REML = TRUE, control = ctrl)
        a <- anova(fit, red, refit = FALSE)
        list(component = random[k], chisq = a$Chisq[2], df = a$Df[2],
             p_chisq = a$`Pr(>Chisq)`[2], logLik_reduced = as.numeric(logLik(red)),
             singular_reduced = isSingular(red))
      } else {
        red <- lm(as.formula(paste("y ~", fixed)), data = d)
        ll <- as.numeric(logLik(red, REML = TRUE))
        rt <- ranova(fit)
        list(component = random[k], chisq = 2 * (out$logLik - ll), df = 1,
             p_chisq = pchisq(2 * (out$logLik - ll), 1, lower.tail = FALSE),
             logLik_reduced = ll, ranova_chisq = rt$LRT[2])
      }
    })
  }
  out
}

# Stack the per-feature outputs of one fit into feature-last arrays.
stack_fits <- function(fits) {
  get <- function(f, path) Reduce(function(x, k) x[[k]], path, f)
  arr <- function(path) do.call(cbind, lapply(fits, get, path = path))
  out <- list(
    theta = arr("theta"), logLik = sapply(fits, `[[`, "logLik"),
    singular = sapply(fits, `[[`, "singular"),
    coefficients = lapply(setNames(nm = names(fits[[1]]$coefficients)),
                          function(k) arr(c("coefficients", k))),
    contrasts = lapply(setNames(nm = names(fits[[1]]$contrasts)),
                       function(k) arr(c("contrasts", k)))
  )
  if (!is.null(fits[[1]][["lrt_fixed"]])) {
    out$lrt_fixed <- lapply(setNames(nm = names(fits[[1]]$lrt_fixed)),
                            function(k) sapply(fits, function(f) f$lrt_fixed[[k]]))
  }
  if (!is.null(fits[[1]][["lrt"]])) {
    out$lrt <- lapply(seq_along(fits[[1]]$lrt), function(k) {
      one <- lapply(fits, function(f) f$lrt[[k]])
      keys <- setdiff(names(one[[1]]), "component")
      c(list(component = one[[1]]$component),
        lapply(setNames(nm = keys), function(key) sapply(one, `[[`, key)))
    })
  }
  out
}

make_case <- function(file, n, nsam, m, random, methods, seed) {
  set.seed(seed)
  cells <- make_cells(n, nsam)
  Y <- simulate_y(cells, m, slope = length(random) > 1)
  fixed <- "0 + cls + cls:trt + x + time"
  fixed_reduced <- "0 + cls + x + time"
  X <- model.matrix(as.formula(paste("~", fixed)), cells)
  cn <- colnames(X)
  L <- matrix(0, length(cn), 2, dimnames = list(cn, c("trt_cls2_vs_cls1", "trt_mean")))
  L[c("cls1:trtB", "cls2:trtB"), "trt_cls2_vs_cls1"] <- c(-1, 1)
  L[c("cls1:trtB", "cls2:trtB"), "trt_mean"] <- c(0.5, 0.5)
  fits <- lapply(setNames(nm = methods), function(method) {
    per_feature <- lapply(seq_len(m), function(j)
      fit_feature(Y[j, ], cells, fixed, random, method == "REML", L, fixed_reduced))
    stack_fits(per_feature)
  })
  case <- list(
    provenance = list(
      script = "make_cases.R", seed = seed, versions = versions(),
      lmerControl = "nloptwrap, xtol_abs 1e-12, ftol_abs 1e-14, xtol_rel 1e-12, ftol_rel 1e-14",
      ddf = "Satterthwaite (lmerTest summary() and contest(joint = FALSE))",
      lrt = paste("REML: anova(full, reduced, refit = FALSE) per random component; against",
                  "lm (REML logLik) for K = 1. ML: anova(full, fixed_reduced) (both ML)")
    ),
    fixed = paste("~", fixed), fixed_reduced = paste("~", fixed_reduced), random = random,
    cells = list(
      n = n, covariates = cn, X = unname(X),
      sam = as.integer(cells$sam), sam_levels = levels(cells$sam),
      time = cells$time, features = rownames(Y), Y = unname(Y)
    ),
    components = c(if (length(random) > 1) c("sam", "time") else "sam", "residual"),
    contrast_names = colnames(L), contrast_matrix = unname(L),
    fits = fits
  )
  writeLines(toJSON(case, digits = NA, auto_unbox = TRUE, matrix = "rowmajor"), file)
  invisible(case)
}

make_case("k1.json", n = 1000, nsam = 12, m = 8, random = "(1 | sam)",
          methods = c("REML", "ML"), seed = 20260101)
make_case("k2.json", n = 1200, nsam = 10, m = 6,
          random = c("(1 | sam)", "(0 + time | sam)"), methods = c("REML", "ML"),
          seed = 20260102)

"""The TF-IDF + LR bar beside the prompt-injection classifiers, by argmax and with the model's decision rule (its
threshold on p(injection) tuned on the same rows as the model's: the validation carve, or the out-of-fold train rows
with classify.folds). No model is trained.   python experiments/prompt_injection_cv/bars.py"""

from sklearn.metrics import f1_score

from sectune.evaluation.classify_scoring import baseline_predictions
from sectune.stages.pipeline import compose
from sectune.training.classification import build_labelled_data

for name, overrides in (("one model, validation carve", ["stage=classify", "dataset=prompt_injections", "logger=none"]),
                        ("+experiment=prompt_injection_cv (folds=5)", ["+experiment=prompt_injection_cv", "logger=none"])):
    cfg = compose(overrides)
    data = build_labelled_data(cfg)
    y = [r["label"] for r in data.splits["test"]]
    for tuned in (False, True):
        preds, info = baseline_predictions(data, "test", int(cfg.train.seed), folds=int(cfg.classify.folds),
                                           fold_seed=int(cfg.dataset.split_seed), tuned=tuned)
        bar = next(k for k in preds if k != "majority")
        params = info[bar]["params"]
        print(f"{name}: {bar} {'tuned threshold' if tuned else 'argmax'}: test macro-F1 "
              f"{f1_score(y, preds[bar], labels=sorted(set(y)), average='macro'):.3f} (C={params['C']}"
              + (f", threshold {params['threshold']:.3f} on {params['threshold_chosen_on']})" if tuned else ")"))

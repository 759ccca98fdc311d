"""The allowed values of every enumerated setting, defined once: the config validates against these and
the code that acts on a setting imports the same tuple (bottom layer: imports nothing of echoink)."""

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
LR_SCHEDULERS = ("constant", "linear", "cosine", "constant_with_warmup")
#: group_sharing: "none" repeats each prompt G times (the usual path); "encoders" runs the media encoders once
#: per prompt; "full" also computes the prompt once (its K/V) in log-prob passes and prefills it once in rollouts.
GROUP_SHARING = ("none", "encoders", "full")
#: report_to: the experiment trackers accelerate knows (`accelerate.utils.LoggerType`).
#: save_strategy / eval_strategy: transformers' names; "steps" uses save_steps / eval_steps, "no" turns it off.
STEP_STRATEGIES = ("steps", "no")
REPORT_TO = ("all", "aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab")
#: Evaluation protocols (echoink.eval.protocols): "ours" (training prompt, strict reward parser) and "echoink"
#: (EchoInk-R1's evaluation script: its prompt, decoding, media caps and fallback parser).
EVAL_PROTOCOLS = ("ours", "echoink")

"""Fine-tuning: the engine (engine.py), its checkpoints, the loop and who it reports to
(loop.py, sessions.py), where a run trains (trainer.py), the frozen-prefix cache, the Ray Tune
sweep over freeze x lr (tuning.py, trials.py), a run made a result (run.py), the study's stage
(stage.py) and `python -m boatray.finetune`."""

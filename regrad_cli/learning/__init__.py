"""Learning and measuring: QA datasets (and synthetic ones), QA scores, meta-training, continual
pretraining and the evaluation harness."""

"""The tool's machinery: what train.py, sample.py and eval.py need to be a tool and a learner can
skip. (Being filled in.)"""

"""Adversarial robustness of text classifiers, measured offline.

:mod:`fedleak.robustness.word_substitution` is a TextFooler-style greedy word-substitution
attack (Jin, Jin, Zhou & Szolovits, "Is BERT Really Robust? A Strong Baseline for Natural
Language Attack on Text Classification and Entailment", AAAI 2020) whose every resource ships
with fedleak's install: substitutes are nearest whole-word neighbours in the bundled MiniLM's
word-embedding table, and sentence similarity is the same MiniLM used as the sentence encoder it
was trained to be.  It reports what the robust-pruning paper (KRP, EMNLP 2023) reports: clean
accuracy, accuracy under attack, attack success rate, words perturbed and queries.

Why not TextAttack's own TextFooler recipe: ``textattack`` 0.3.11 installs from PyPI, but the
recipe loads at run time (1) the counter-fitted word embeddings from TextAttack's S3 bucket
(``download_from_s3``), (2) the Universal Sentence Encoder from TensorFlow Hub (plus
``tensorflow`` and ``tensorflow_hub``), and (3) NLTK's perceptron POS tagger through
``nltk.download``; none of the three is a package, so it cannot run on a machine that reaches
only package registries.
"""

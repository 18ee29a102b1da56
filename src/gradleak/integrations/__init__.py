"""Bridges to federated-learning frameworks.

`capture` is the on-disk format of what a server saw (no framework needed to
read it); `flower` wraps a Flower strategy to write it.  Importing this
package imports no framework: only `gradleak.integrations.flower` imports
Flower, and only when it is imported itself.
"""

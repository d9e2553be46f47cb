"""Quantum Detectors Merlin: the MIB format (:mod:`beamloop.streams.merlin.mib`) and a receiver of its TCP data
stream (:mod:`beamloop.streams.merlin.receiver`)."""

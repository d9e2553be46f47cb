"""Physical constants and conversions shared by the simulator and the beam-safety rules.

The elementary charge has one source here: :data:`scipy.constants.elementary_charge`, the CODATA
recommended value, exact (1.602176634e-19 C) since the 2019 revision of the SI.
"""

from __future__ import annotations

from scipy.constants import elementary_charge

PICOAMPERE = 1e-12
"""One picoampere in ampere."""


def electrons_per_second(current_pA: float) -> float:
    """Electrons per second carried by a beam current, ``I / e``.

    Parameters
    ----------
    current_pA : float
        Probe current, picoampere.

    Returns
    -------
    float
        Electrons per second.

    Notes
    -----
    ``e`` is :data:`scipy.constants.elementary_charge` (CODATA [1]_), a defining constant of the SI [2]_.

    References
    ----------
    .. [1] E. Tiesinga, P. J. Mohr, D. B. Newell and B. N. Taylor, "CODATA recommended values of the
       fundamental physical constants: 2018", Rev. Mod. Phys. 93, 025010 (2021).
    .. [2] Bureau International des Poids et Mesures, "The International System of Units (SI)", 9th
       edition (2019), section 2.2.

    Examples
    --------
    >>> round(electrons_per_second(1.0))
    6241509
    """
    return current_pA * PICOAMPERE / elementary_charge

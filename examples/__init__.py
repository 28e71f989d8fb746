"""The example data shipped inside the package as ``volgen.examples`` (the scripts in the subfolders are not).

:data:`EXAMPLE` is the Colin27 tissue segmentation at 2 mm that the README's first command generates from;
``volgen generate example`` and ``volgen example PATH`` reach it without a checkout
(:func:`volgen.cli.checks.example_path`).
"""

#: The example segmentation: Colin27 tissues (head, CSF, grey matter, white matter) at 2 mm.
EXAMPLE = "colin27_tissues_2mm.nii.gz"

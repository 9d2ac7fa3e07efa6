"""Strict readers of file headers that a library would also parse.

Where our reading of a header and the library's could disagree (a key in another case, a duplicate, a
line the library splits elsewhere), the library's reading wins in practice, since it is the one that opens
files and allocates memory. So for the formats that ITK reads from uploads (.mha, .nrrd) we parse the header
ourselves, strictly, refuse anything we do not understand exactly, check the data against it, and hand ITK
only a canonical copy that we wrote: it never sees the uploaded header.
"""

def maxsim(*a, **k): raise NotImplementedError
def maxsim_ref(*a, **k): raise NotImplementedError

"""One file per op: registration, autograd and the public function; kernels per backend."""

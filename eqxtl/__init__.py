"""eqxtl: transfer learning in JAX with Equinox."""

"""The TVM backend for GPUs (opencl, metal): `backend` (the Backend), `lowering` (a scheduled
TensorIR function to device source and a launch table), and the schedules of their own for the
GEMMs (`linear`), attention (`attention`) and the norms that stand alone (`norm`)."""

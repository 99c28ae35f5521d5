"""The TVM backend: TensorIR kernels with hand schedules for CPUs, built with apache-tvm.

Imported only where kernels are built; `import llmc` does not import TVM. TVM's thread pool
reads TVM_NUM_THREADS when it starts; left unset it ran one thread on our 2-core machines, which
halves the bandwidth of every decode kernel. We set it to the number of cores unless the user did.
"""

import os

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

// SPDX-License-Identifier: MIT
// attend::precompiled: the explicit instantiation definitions of the cores that
// <attend/extern_templates.hpp> declares extern (see that header). Compile this file with the
// same flags as the code that uses it.
#define ATTEND_INSTANTIATE_PRECOMPILED
#include <attend/extern_templates.hpp>

/* Test-only PKCS#11 module standing in for a network HSM that goes away or hangs.
 *
 * It forwards every call to the module named by DIVKEY_SHIM_REAL (SoftHSM2) and reads the
 * file named by DIVKEY_SHIM_CONTROL before the calls divkey makes per request: "down" makes
 * them fail with CKR_DEVICE_REMOVED, "hang" blocks them until the file says otherwise.
 * C_Initialize and C_Finalize always pass, so the service can re-initialise the library.
 * Only functions of at most six word-sized arguments are wrapped (x86-64 passes those in
 * registers, so one generic wrapper forwards them all). */
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>
#include <unistd.h>

typedef unsigned long W;
typedef W CK_RV;
typedef struct { unsigned char major, minor; } CK_VERSION;
#define NFUNCS 68
typedef struct { CK_VERSION version; void *fn[NFUNCS]; } FunctionList;
typedef CK_RV (*Fn6)(W, W, W, W, W, W);

static FunctionList *real;
static FunctionList mine;

static int mode(void) {
    const char *path = getenv("DIVKEY_SHIM_CONTROL");
    if (!path) return 0;
    FILE *f = fopen(path, "r");
    if (!f) return 0;
    char buf[16] = {0};
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    (void)n;
    fclose(f);
    if (!strncmp(buf, "down", 4)) return 1;
    if (!strncmp(buf, "hang", 4)) return 2;
    return 0;
}

static CK_RV gate(void) {
    for (;;) {
        int m = mode();
        if (m == 1) return 0x32; /* CKR_DEVICE_REMOVED */
        if (m == 2) { usleep(20000); continue; }
        return 0;
    }
}

#define WRAP(i) \
    static CK_RV w##i(W a, W b, W c, W d, W e, W f) { \
        CK_RV rv = gate(); \
        if (rv) return rv; \
        return ((Fn6)real->fn[i])(a, b, c, d, e, f); \
    }

/* Indexes in CK_FUNCTION_LIST (PKCS#11 v2.40 order). */
WRAP(4)  /* C_GetSlotList */
WRAP(6)  /* C_GetTokenInfo */
WRAP(12) /* C_OpenSession */
WRAP(15) /* C_GetSessionInfo */
WRAP(18) /* C_Login */
WRAP(24) /* C_GetAttributeValue */
WRAP(26) /* C_FindObjectsInit */
WRAP(42) /* C_SignInit */
WRAP(43) /* C_Sign */

CK_RV C_GetFunctionList(FunctionList **out) {
    if (!real) {
        const char *path = getenv("DIVKEY_SHIM_REAL");
        void *lib = path ? dlopen(path, RTLD_NOW | RTLD_LOCAL) : NULL;
        if (!lib) return 0x5; /* CKR_GENERAL_ERROR */
        CK_RV (*get)(FunctionList **) = (CK_RV (*)(FunctionList **))dlsym(lib, "C_GetFunctionList");
        if (!get || get(&real) != 0) return 0x5;
        memcpy(&mine, real, sizeof mine);
        mine.fn[4] = (void *)w4;
        mine.fn[6] = (void *)w6;
        mine.fn[12] = (void *)w12;
        mine.fn[15] = (void *)w15;
        mine.fn[18] = (void *)w18;
        mine.fn[24] = (void *)w24;
        mine.fn[26] = (void *)w26;
        mine.fn[42] = (void *)w42;
        mine.fn[43] = (void *)w43;
    }
    *out = &mine;
    return 0;
}

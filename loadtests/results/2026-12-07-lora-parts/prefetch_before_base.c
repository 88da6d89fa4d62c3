// Does prefetching the next LoRA call's weights before the base model's stream hide their DRAM latency?
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <immintrin.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
#define BASE_MB 12
#define LAYERS 30
int main(int argc,char**argv){
  int mode=atoi(argv[1]); // 0 none, 1 prefetch all lines, 2 prefetch first lines only
  size_t base_n=(size_t)BASE_MB*1024*1024/4;
  float*base=aligned_alloc(64,base_n*4*LAYERS/4); // 90 MB total, each layer streams its own 3 MB chunk x4
  size_t lora_n=340*1024/4;
  float*lora=aligned_alloc(64,lora_n*4*LAYERS);
  for(size_t i=0;i<base_n*LAYERS/4;i++)base[i]=i*1e-9f;
  for(size_t i=0;i<lora_n*LAYERS;i++)lora[i]=i*1e-9f;
  volatile float sink=0; double tb=0,tl=0;
  size_t chunk=base_n/4*4; // 12 MB per layer
  float*big=aligned_alloc(64,(size_t)600*1024*1024); memset(big,1,(size_t)600*1024*1024);
  size_t bign=(size_t)600*1024*1024/4;
  size_t pos=0;
  for(int it=0;it<40;it++){
    for(int l=0;l<LAYERS;l++){
      float*w=lora+(size_t)l*lora_n;
      if(mode==1) for(size_t i=0;i<lora_n;i+=16) _mm_prefetch((const char*)(w+i),_MM_HINT_T1);
      if(mode==2) for(size_t i=0;i<lora_n;i+=16*64) _mm_prefetch((const char*)(w+i),_MM_HINT_T1);
      double t0=now();
      __m256 acc=_mm256_setzero_ps();
      for(size_t i=0;i<chunk;i+=8){ if(pos+8>bign)pos=0; acc=_mm256_add_ps(acc,_mm256_load_ps(big+pos)); pos+=8;}
      double t1=now();
      __m256 acc2=_mm256_setzero_ps();
      for(size_t i=0;i<lora_n;i+=8) acc2=_mm256_fmadd_ps(acc2,acc2,_mm256_load_ps(w+i));
      double t2=now();
      float o[8];_mm256_storeu_ps(o,_mm256_add_ps(acc,acc2));sink+=o[0];
      if(it>=5){tb+=t1-t0;tl+=t2-t1;}
    }
  }
  printf("mode %d base %.3f ms/step lora %.3f ms/step total %.3f\n",mode,tb/35*1e3,tl/35*1e3,(tb+tl)/35*1e3);
  return 0;
}
